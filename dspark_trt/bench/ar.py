"""Our autoregressive decode (engine, schedule off) on torch and, optionally, on ONNX Runtime engines,
vs transformers `generate` and, where installed, onnxruntime-genai's int4 model of the same weights
(bench/peers.py) and llama.cpp on the same GGUF (bench/llama_cpp_peer.py): same prompt, same process, same
thread count, interleaved repeats.

Every row reports tokens/s over the whole request (prefill included, the original `*_tokens_per_second`
keys) and decode tokens/s after the first token (`*_decode_tokens_per_second`)."""
from __future__ import annotations

import statistics
import time

import torch

from dspark_trt.bench.common import environment, timed
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.errors import DSparkError
from dspark_trt.models.sources import resolve_model
from dspark_trt.models.weights import load_target
from dspark_trt.runtimes.torch_runtime import TorchRuntime


class _FirstTokenClock:
    """A transformers streamer that only notes when the first new token arrives (its first `put` is the
    prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def bench_ar(target: str, prompt: str, max_tokens: int, repeats: int, progress=lambda msg: None,
             engines: str | None = None, genai: bool = True, genai_model: str | None = None,
             genai_accuracy_level: int | None = None, llama_cpp: bool = True) -> dict:
    """Tokens/s of each contender, timed interleaved: our engine on torch, on ONNX Runtime when
    `engines` (a build-engines directory of this target) is given, onnxruntime-genai's int4 model of the
    same weights when `genai` and the package is installed (`genai_model`: its model directory, else the
    one built and cached from the target), llama.cpp greedy on the target's GGUF when `llama_cpp` and
    llama-cpp-python is installed, and transformers generate."""
    from transformers import AutoModelForCausalLM

    from dspark_trt.bench import peers
    from dspark_trt.bench.llama_cpp_peer import LLAMA_NAME, llama_cpp_peer

    threads = peers.pin_threads()  # every row, ours and the peers, on the same number of threads
    model, tokenizer = load_target(target)
    source = resolve_model(target)
    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                              dtype=torch.float32).eval()
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    # fixed length on every side: no stop token, exactly max_tokens new tokens
    params = SamplingParams(max_tokens=max_tokens)
    seq_len = len(prompt_ids) + max_tokens + 8

    # each run returns (new token ids, seconds from its start to its first new token)
    def engine_run(runtime):
        engine = Engine(runtime)

        def run():
            start = time.perf_counter()
            request = engine.generate([prompt_ids], params)[0]
            return request.output_ids, request.stats.first_token_time - start
        return run

    def transformers_run():
        clock = _FirstTokenClock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=tokenizer.eos_token_id, streamer=clock)
        return out[0, len(prompt_ids):].tolist(), clock.first - start

    def peer_run(peer):
        def run():
            got = peer.generate(prompt_ids, max_tokens)
            return got.output_ids, got.first_token_seconds
        return run

    contenders = {"ours": engine_run(TorchRuntime(model, num_slots=1, max_seq_len=seq_len))}
    if engines is not None:
        from dspark_trt.runtimes.ort_runtime import OrtRuntime

        contenders["onnxruntime"] = engine_run(OrtRuntime(engines, num_slots=1, max_seq_len=seq_len,
                                                          use_drafter=False, threads=threads))
    # key -> (display name, peer or None, the reason it is skipped)
    peer_slots = {
        "onnxruntime_genai": (peers.GENAI_NAME, *(
            peers.genai_peer(source, hf, genai_accuracy_level, genai_model, threads, progress) if genai
            else (None, "not requested (--no-genai)"))),
        "llama_cpp": (LLAMA_NAME, *(llama_cpp_peer(source, seq_len, threads) if llama_cpp
                                    else (None, "not requested (--no-llama-cpp)"))),
    }
    for key, (name, peer, skipped) in peer_slots.items():
        if peer is None:
            progress(f"{name} row skipped: {skipped}")
        else:
            contenders[key] = peer_run(peer)
    contenders["transformers"] = transformers_run
    for run in contenders.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    decode_seconds: dict[str, list[float]] = {name: [] for name in contenders}
    same = True
    peer_agreement: dict[str, dict[str, dict]] = {key: {} for key in peer_slots}
    for i in range(repeats):
        outputs = {}
        for name, run in contenders.items():
            (outputs[name], first), elapsed = timed(run)
            seconds[name].append(elapsed)
            decode_seconds[name].append(elapsed - first)
        # transformers' min_new_tokens (and genai's min_length) mask EOS while ours and llama.cpp run through
        # it: compare up to our first EOS
        ours = outputs["ours"]
        cut = next((k for k, t in enumerate(ours) if t in model.config.eos_token_ids), len(ours))
        same &= all(ids[:cut] == ours[:cut] for name, ids in outputs.items() if name not in peer_slots)
        for key in peer_slots.keys() & outputs.keys():  # other kernels or precision: agreement measured
            for ref in ("ours", "onnxruntime"):
                if ref in outputs:
                    got = peers.agreement(outputs[ref][:cut], outputs[key][:cut])
                    kept = peer_agreement[key].get(ref)
                    if kept is None or got["agreeing_prefix_tokens"] < kept["agreeing_prefix_tokens"]:
                        peer_agreement[key][ref] = got  # the worst repeat
        progress(f"repeat {i + 1}/{repeats}: " + ", ".join(
            f"{name} {max_tokens / s[-1]:.1f} tok/s (decode "
            f"{(max_tokens - 1) / max(decode_seconds[name][-1], 1e-9):.1f})" for name, s in seconds.items()))
    tps = {name: max_tokens / statistics.median(s) for name, s in seconds.items()}
    decode_tps = {name: (max_tokens - 1) / statistics.median(s) if max_tokens > 1 else None
                  for name, s in decode_seconds.items()}
    result = {"benchmark": "ar", "target": target, "prompt_tokens": len(prompt_ids), "new_tokens": max_tokens,
              "repeats": repeats, "ours_tokens_per_second": tps["ours"],
              "transformers_tokens_per_second": tps["transformers"], "ratio": tps["ours"] / tps["transformers"],
              "token_identical": same, "environment": environment(),
              "ours_decode_tokens_per_second": decode_tps["ours"],
              "transformers_decode_tokens_per_second": decode_tps["transformers"],
              "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": threads,
                          "onnxruntime_genai_intra_op": threads, "llama_cpp_n_threads": threads}}
    if engines is not None:
        result.update(engines=str(engines), onnxruntime_tokens_per_second=tps["onnxruntime"],
                      onnxruntime_vs_torch=tps["onnxruntime"] / tps["ours"],
                      onnxruntime_decode_tokens_per_second=decode_tps["onnxruntime"])
    result["peers"] = []
    for key, (name, peer, skipped) in peer_slots.items():
        row = _peer_row(key, name, peer, skipped, tps, decode_tps, peer_agreement[key])
        result["peers"].append(row)
        if peer is not None:
            result[f"{key}_decode_tokens_per_second"] = row["decode_tokens_per_second"]
            result[f"ours_vs_{key}"] = row["ours_decode_ratio"]
            if engines is not None:
                result[f"onnxruntime_vs_{key}"] = row["onnxruntime_decode_ratio"]
    return result


def _peer_row(key: str, name: str, peer, skipped: str | None, tps: dict, decode_tps: dict,
              agreement: dict) -> dict:
    """A peer's row: ran (speeds, our decode speed over its own, agreement, what ran) or skipped."""
    if peer is None:
        return {"name": name, "status": "skipped", "reason": skipped}
    theirs = decode_tps[key]

    def ratio(ours):
        return ours / theirs if ours and theirs else None
    row = {"name": name, "status": "ran", "description": peer.describe(), "what_ran": peer.summary(),
           "tokens_per_second": tps[key], "decode_tokens_per_second": theirs,
           # ours over theirs, decode after the first token: >= 1.0 means we are at least as fast
           "ours_decode_ratio": ratio(decode_tps["ours"]),
           "agreement_with_ours": agreement.get("ours")}
    if "onnxruntime" in decode_tps:
        row.update(onnxruntime_decode_ratio=ratio(decode_tps["onnxruntime"]),
                   agreement_with_onnxruntime=agreement.get("onnxruntime"))
    return row


def ar_decode_table(result: dict) -> str:
    """Decode tok/s after the first token of every row of `bench ar`, and the peers' rows."""
    def num(value):
        return "n/a" if value is None else f"{value:.2f}"

    rows = [("ours (torch)", result.get("ours_decode_tokens_per_second"))]
    if "onnxruntime_decode_tokens_per_second" in result:
        rows.append(("ours (onnxruntime engines)", result["onnxruntime_decode_tokens_per_second"]))
    rows.append(("transformers generate", result.get("transformers_decode_tokens_per_second")))
    lines = [f"decode tok/s after the first token ({result['new_tokens'] - 1} tokens, median of "
             f"{result['repeats']}):"]
    lines += [f"  {name:<28} {tps:8.1f}" for name, tps in rows if tps is not None]
    for peer in result.get("peers", []):
        if peer["status"] != "ran":
            lines.append(f"  {peer['name']:<28} skipped: {peer['reason']}")
            continue
        ref = "onnxruntime" if "onnxruntime_decode_ratio" in peer else "ours"
        ratio = peer[f"{ref}_decode_ratio"]
        agreement = peer.get(f"agreement_with_{ref}") or {}
        at = agreement.get("first_divergence")
        peer_tps = peer["decode_tokens_per_second"]
        same = "identical" if at is None else f"diverge at position {at}"
        lines.append(f"  {peer['name']:<28} {peer_tps if peer_tps is not None else float('nan'):8.1f}   "
                     f"ours ({ref}) / peer {num(ratio)}x; greedy tokens {same} "
                     f"of {agreement.get('compared_tokens')} compared")
        lines.append(f"  {'':<28} ran: {peer['what_ran']}")
    return "\n".join(lines)
