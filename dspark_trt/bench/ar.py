"""Our autoregressive decode (engine, schedule off) on torch and, optionally, on ONNX Runtime engines,
vs transformers `generate` and, where installed, onnxruntime-genai's int4 model of the same weights
(bench/peers.py): same prompt, same process, interleaved repeats.

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


def genai_peer(source, hf_model, accuracy_level: int | None, model_dir: str | None, threads: int, progress):
    """(GenaiPeer, None) or (None, reason it is skipped)."""
    from dspark_trt.bench import peers

    try:
        peers.import_genai()
        if model_dir is None:
            model_dir = peers.prepare_genai_model(source, accuracy_level, progress=progress, loaded=hf_model)
        return peers.GenaiPeer(model_dir, threads=threads), None
    except peers.GenaiUnavailable as exc:
        return None, exc.reason
    except DSparkError as exc:
        if model_dir is not None:  # the user named the model: their error, not a skip
            raise
        return None, f"{peers.GENAI_NAME} model could not be built: {exc}"


def bench_ar(target: str, prompt: str, max_tokens: int, repeats: int, progress=lambda msg: None,
             engines: str | None = None, genai: bool = True, genai_model: str | None = None,
             genai_accuracy_level: int | None = None) -> dict:
    """Tokens/s of each contender, timed interleaved: our engine on torch, on ONNX Runtime when
    `engines` (a build-engines directory of this target) is given, onnxruntime-genai's int4 model of the
    same weights when `genai` and the package is installed (`genai_model`: its model directory, else the
    one built and cached from the target), and transformers generate."""
    from transformers import AutoModelForCausalLM

    from dspark_trt.bench import peers

    model, tokenizer = load_target(target)
    source = resolve_model(target)
    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                              dtype=torch.float32).eval()
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    # fixed length on every side: no stop token, exactly max_tokens new tokens
    params = SamplingParams(max_tokens=max_tokens)
    seq_len = len(prompt_ids) + max_tokens + 8
    threads = peers.default_threads()  # our ONNX Runtime sessions' intra-op threads; the peer gets the same

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

    contenders = {"ours": engine_run(TorchRuntime(model, num_slots=1, max_seq_len=seq_len))}
    if engines is not None:
        from dspark_trt.runtimes.ort_runtime import OrtRuntime

        contenders["onnxruntime"] = engine_run(OrtRuntime(engines, num_slots=1, max_seq_len=seq_len,
                                                          use_drafter=False))
    peer, skipped = None, "not requested (--no-genai)"
    if genai:
        peer, skipped = genai_peer(source, hf, genai_accuracy_level, genai_model, threads, progress)
        if peer is None:
            progress(f"{peers.GENAI_NAME} row skipped: {skipped}")
        else:
            def genai_run():
                run = peer.generate(prompt_ids, max_tokens)
                return run.output_ids, run.first_token_seconds
            contenders["onnxruntime_genai"] = genai_run
    contenders["transformers"] = transformers_run
    for run in contenders.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    decode_seconds: dict[str, list[float]] = {name: [] for name in contenders}
    same = True
    peer_agreement: dict[str, dict] = {}
    for i in range(repeats):
        outputs = {}
        for name, run in contenders.items():
            (outputs[name], first), elapsed = timed(run)
            seconds[name].append(elapsed)
            decode_seconds[name].append(elapsed - first)
        # transformers' min_new_tokens (and the peer's min_length) mask EOS while ours runs through it:
        # compare up to our first EOS
        ours = outputs["ours"]
        cut = next((k for k, t in enumerate(ours) if t in model.config.eos_token_ids), len(ours))
        same &= all(ids[:cut] == ours[:cut] for name, ids in outputs.items() if name != "onnxruntime_genai")
        if "onnxruntime_genai" in outputs:  # a different precision: agreement measured, not required
            for ref in ("ours", "onnxruntime"):
                if ref in outputs:
                    got = peers.agreement(outputs[ref][:cut], outputs["onnxruntime_genai"][:cut])
                    kept = peer_agreement.get(ref)
                    if kept is None or got["agreeing_prefix_tokens"] < kept["agreeing_prefix_tokens"]:
                        peer_agreement[ref] = got  # the worst repeat
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
              "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": threads}}
    if engines is not None:
        result.update(engines=str(engines), onnxruntime_tokens_per_second=tps["onnxruntime"],
                      onnxruntime_vs_torch=tps["onnxruntime"] / tps["ours"],
                      onnxruntime_decode_tokens_per_second=decode_tps["onnxruntime"])
    result["peers"] = [_genai_row(peer, skipped, tps, decode_tps, peer_agreement)]
    if peer is not None:
        row = result["peers"][0]
        result.update(onnxruntime_genai_decode_tokens_per_second=row["decode_tokens_per_second"],
                      ours_vs_onnxruntime_genai=row["ours_decode_ratio"])
        if engines is not None:
            result["onnxruntime_vs_onnxruntime_genai"] = row["onnxruntime_decode_ratio"]
    return result


def _genai_row(peer, skipped: str | None, tps: dict, decode_tps: dict, agreement: dict) -> dict:
    """The onnxruntime-genai row: ran (speeds, our decode speed over its own, agreement, what ran) or skipped."""
    from dspark_trt.bench.peers import GENAI_NAME

    if peer is None:
        return {"name": GENAI_NAME, "status": "skipped", "reason": skipped}
    name = "onnxruntime_genai"
    theirs = decode_tps[name]

    def ratio(ours):
        return ours / theirs if ours and theirs else None
    row = {"name": GENAI_NAME, "status": "ran", "description": peer.describe(),
           "tokens_per_second": tps[name], "decode_tokens_per_second": theirs,
           # ours over theirs, decode after the first token: >= 1.0 means we are at least as fast
           "ours_decode_ratio": ratio(decode_tps["ours"]),
           "agreement_with_ours": agreement.get("ours")}
    if "onnxruntime" in decode_tps:
        row.update(onnxruntime_decode_ratio=ratio(decode_tps["onnxruntime"]),
                   agreement_with_onnxruntime=agreement.get("onnxruntime"))
    return row


def ar_decode_table(result: dict) -> str:
    """Decode tok/s after the first token of every row of `bench ar`, and the peers' rows."""
    from dspark_trt.bench.peers import describe_row

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
        lines.append(f"  {'':<28} ran: {describe_row(peer['description'])}")
    return "\n".join(lines)
