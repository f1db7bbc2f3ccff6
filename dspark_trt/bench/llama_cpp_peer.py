"""The llama.cpp peer of `bench ar` and `bench speedup` (llama-cpp-python, `pip install -e '.[peers]'`).

It reads the very GGUF our target comes from (SmolLM2-135M-Instruct Q4_1) and runs it on llama.cpp's own
CPU kernels in our process: plain greedy decoding, and the binding's own speculative mode, prompt lookup
(`LlamaPromptLookupDecoding` as `draft_model`). Both are fed our chat-templated prompt ids, so every row
decodes the same tokens. The binding's Python loop (one `generate` step per token) is part of what is timed,
as our own engine's Python is.

Greedy means greedy here: temperature 0 (llama.cpp's greedy sampler) with top_k 1, and the penalties, which
llama-cpp-python applies before any sampler, neutral (repeat_penalty 1.0: its completion API defaults to
1.1). Every request starts from an empty context: `Llama.generate` would otherwise reuse the KV cache of
the previous request's common prefix (the chat template's system turn) and skip part of the prefill.
"""
from __future__ import annotations

import time
from pathlib import Path

from dspark_trt.bench.peers import PeerRun, PeerUnavailable, import_peer
from dspark_trt.errors import DSparkError
from dspark_trt.models.sources import ModelSource

LLAMA_NAME = "llama.cpp"
LOOKUP_NAME = "llama.cpp prompt lookup"
LOOKUP_MAX_NGRAM = 2  # LlamaPromptLookupDecoding's default, as transformers' prompt lookup


def peer_name(prompt_lookup_tokens: int | None = None) -> str:
    """The row's name: plain llama.cpp, or its prompt lookup with this draft length."""
    return LLAMA_NAME if prompt_lookup_tokens is None else f"{LOOKUP_NAME} ({prompt_lookup_tokens})"


def import_llama_cpp():
    return import_peer("llama_cpp", "llama-cpp-python")


class LlamaCppPeer:
    """llama.cpp on one GGUF, CPU only, n_threads for both decoding and prompt processing.

    n_ctx: the most prompt + new tokens a request holds. prompt_lookup_tokens: None for plain decoding, else the
    prompt-lookup draft length per step."""

    def __init__(self, gguf: str | Path, n_ctx: int, threads: int, prompt_lookup_tokens: int | None = None):
        self.llama_cpp = import_llama_cpp()
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.gguf = Path(gguf)
        self.n_ctx = n_ctx
        self.threads = threads
        self.prompt_lookup_tokens = prompt_lookup_tokens
        draft = None if prompt_lookup_tokens is None else LlamaPromptLookupDecoding(
            max_ngram_size=LOOKUP_MAX_NGRAM, num_pred_tokens=prompt_lookup_tokens)
        # llama-cpp-python cuts a draft to the context llama.cpp allocated (padded up) but writes it into arrays
        # of the size asked for: room for one step's draft past the last token
        self.llm = self.llama_cpp.Llama(model_path=str(self.gguf), n_ctx=n_ctx + (prompt_lookup_tokens or 0) + 1,
                                        n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, draft_model=draft,
                                        verbose=False)

    def generate(self, prompt_ids: list[int], max_tokens: int, stop_ids: tuple[int, ...] = ()) -> PeerRun:
        """Greedy new tokens: max_tokens of them, or fewer up to and including the first of stop_ids (as our
        engine counts them). Without stop_ids it runs through EOS, exactly max_tokens, as our engine does."""
        if len(prompt_ids) + max_tokens > self.n_ctx:
            raise DSparkError(f"{peer_name(self.prompt_lookup_tokens)}: {len(prompt_ids)} prompt + {max_tokens} new "
                              f"tokens exceed the {self.n_ctx} it was made for")
        self.llm.reset()
        ids: list[int] = []
        first = None
        start = time.perf_counter()
        for token in self.llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0,
                                       repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
            if first is None:
                first = time.perf_counter()
            ids.append(int(token))
            if len(ids) >= max_tokens or token in stop_ids:
                break
        end = time.perf_counter()
        return PeerRun(ids, end - start, first - start)

    def describe(self) -> dict:
        """Exactly what runs: versions, threads, quantization, context, sampling, speculation, CPU features."""
        import gguf

        file_type = self.llm.metadata.get("general.file_type")
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type else None
        return {"llama_cpp_python": self.llama_cpp.__version__, "gguf": str(self.gguf),
                "quantization": quantization, "n_ctx": self.llm.n_ctx(), "n_batch": self.llm.n_batch,
                "n_threads": self.threads, "n_threads_batch": self.threads, "device": "cpu",
                "sampling": "greedy: temp 0, top_k 1, repeat_penalty 1.0, no frequency/presence penalty",
                "prompt_lookup": None if self.prompt_lookup_tokens is None else {
                    "num_pred_tokens": self.prompt_lookup_tokens, "max_ngram_size": LOOKUP_MAX_NGRAM},
                "system_info": self.llama_cpp.llama_print_system_info().decode(errors="replace").strip()}

    def summary(self) -> str:
        """One line for the benchmark's table: what ran."""
        described = self.describe()
        lookup = described["prompt_lookup"]
        spec = "" if lookup is None else (f", prompt lookup {lookup['num_pred_tokens']} tokens "
                                          f"(n-gram <= {lookup['max_ngram_size']})")
        return (f"llama-cpp-python {described['llama_cpp_python']} (CPU), {described['quantization']} GGUF, "
                f"n_ctx {described['n_ctx']}, {described['n_threads']} threads{spec}")


def llama_cpp_peer(source: ModelSource, n_ctx: int, threads: int,
                   prompt_lookup_tokens: int | None = None) -> tuple[LlamaCppPeer | None, str | None]:
    """(LlamaCppPeer, None) or (None, the reason the row is skipped)."""
    try:
        import_llama_cpp()
    except PeerUnavailable as exc:
        return None, exc.reason
    if source.kind != "gguf":
        return None, f"the target is not a GGUF file ({source.path}); llama.cpp reads GGUF only"
    return LlamaCppPeer(source.path, n_ctx, threads, prompt_lookup_tokens), None
