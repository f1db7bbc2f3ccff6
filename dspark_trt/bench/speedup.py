"""Batch-1 greedy speedup of DSpark over AR on the same runtime: per prompt, AR and DSpark runs are
interleaved in one process, outputs are checked token-identical, τ is reported.

Peers run on the same prompts in the same loop: transformers `generate` (greedy) and its prompt-lookup
mode (`prompt_lookup_num_tokens`), each reported as tokens/s, ratio to our AR and whether its tokens
equal our AR's. llama.cpp (llama-cpp-python) is listed as skipped: it is not installed here."""
from __future__ import annotations

from dspark_trt.bench.common import environment, timed
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.models.sources import resolve_model


PROMPT_LOOKUP_TOKENS = 10  # transformers' usual prompt_lookup_num_tokens


def bench_speedup(target: str, draft: str, prompts: list[str], max_tokens: int, schedule: str = "fixed",
                  progress=lambda msg: None, peers: bool = True, engines: str | None = None,
                  cost_table: str | None = None) -> dict:
    """engines: a build-engines directory, so both decoders run on ONNX Runtime (else the torch runtime)."""
    options = EngineOptions(target=target, draft=draft, engines=engines, schedule=schedule, cost_table=cost_table,
                            num_slots=1)
    ar, tokenizer = build_engine(EngineOptions(target=target, engines=engines, schedule="off", num_slots=1))
    spec, _ = build_engine(options)
    stop = tuple(ar.runtime.eos_token_ids)
    params = SamplingParams(max_tokens=max_tokens, stop_ids=stop)
    peer_runs = _transformers_peers(target, stop, max_tokens) if peers else {}
    warm = chat_prompt_ids(tokenizer, "Hello")
    ar.generate([warm], SamplingParams(max_tokens=4))
    spec.generate([warm], SamplingParams(max_tokens=4))
    for run in peer_runs.values():
        run(warm[:8])
    rows, ar_tokens, ar_seconds, spec_tokens, spec_seconds, taus = [], 0, 0.0, 0, 0.0, []
    peer_totals = {name: {"tokens": 0, "seconds": 0.0, "identical": True} for name in peer_runs}
    for i, prompt in enumerate(prompts):
        ids = chat_prompt_ids(tokenizer, prompt)
        a, a_s = timed(lambda: ar.generate([ids], params)[0])
        s, s_s = timed(lambda: spec.generate([ids], params)[0])
        for name, run in peer_runs.items():
            out, seconds = timed(lambda: run(ids))
            peer_totals[name]["tokens"] += len(out)
            peer_totals[name]["seconds"] += seconds
            peer_totals[name]["identical"] &= out == a.output_ids
        ar_tokens += len(a.output_ids)
        ar_seconds += a_s
        spec_tokens += len(s.output_ids)
        spec_seconds += s_s
        taus += s.stats.accepted_lengths
        rows.append({"prompt": i, "tokens": len(a.output_ids), "identical": a.output_ids == s.output_ids,
                     "ar_tokens_per_second": len(a.output_ids) / a_s,
                     "dspark_tokens_per_second": len(s.output_ids) / s_s,
                     "mean_accepted_length": s.stats.mean_accepted_length})
        progress(f"prompt {i + 1}/{len(prompts)}: AR {rows[-1]['ar_tokens_per_second']:.1f} tok/s, DSpark "
                 f"{rows[-1]['dspark_tokens_per_second']:.1f} tok/s, tau {s.stats.mean_accepted_length:.2f}")
    ar_tps, spec_tps = ar_tokens / ar_seconds, spec_tokens / spec_seconds
    peer_rows = [{"name": name, "tokens_per_second": t["tokens"] / t["seconds"],
                  "ratio_to_ar": t["tokens"] / t["seconds"] / ar_tps, "token_identical_to_ar": t["identical"]}
                 for name, t in peer_totals.items()]
    if peers:
        peer_rows.append({"name": "llama.cpp (llama-cpp-python)", "skipped": _llama_cpp_skip_reason()})
    return {"benchmark": "speedup", "target": target, "draft": str(draft), "schedule": schedule,
            "runtime": spec.runtime.name, "engines": engines, "cost_table": cost_table,
            "prompts": len(prompts), "max_tokens": max_tokens, "ar_tokens_per_second": ar_tps,
            "dspark_tokens_per_second": spec_tps, "speedup": spec_tps / ar_tps,
            "mean_accepted_length": sum(taus) / len(taus) if taus else None,
            "all_token_identical": all(r["identical"] for r in rows), "peers": peer_rows, "per_prompt": rows,
            "environment": environment()}


def _transformers_peers(target: str, stop: tuple[int, ...], max_tokens: int) -> dict:
    """name -> run(prompt ids) -> new token ids, for transformers generate and its prompt-lookup mode."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model(target)
    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                              dtype=torch.float32).eval()

    def runner(**extra):
        def run(ids: list[int]) -> list[int]:
            with torch.inference_mode():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                  eos_token_id=list(stop) or None, pad_token_id=stop[0] if stop else None, **extra)
            return out[0, len(ids):].tolist()
        return run

    lookup = f"transformers prompt lookup ({PROMPT_LOOKUP_TOKENS})"
    return {"transformers generate": runner(), lookup: runner(prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)}


def _llama_cpp_skip_reason() -> str:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed"
    return "llama-cpp-python is installed but no runner is wired up yet"


def speedup_table(result: dict) -> str:
    """The printed summary: AR, DSpark and every peer side by side."""
    rows = [f"{'decoder':<36} {'tok/s':>8} {'vs AR':>6}  token-identical to AR",
            f"{'ours AR':<36} {result['ar_tokens_per_second']:>8.1f} {1.0:>6.2f}  -",
            f"{'ours DSpark (' + result['schedule'] + ')':<36} {result['dspark_tokens_per_second']:>8.1f} "
            f"{result['speedup']:>6.2f}  {result['all_token_identical']}  (tau {result['mean_accepted_length']:.2f})"]
    for peer in result.get("peers", []):
        if "skipped" in peer:
            rows.append(f"{peer['name']:<36} skipped: {peer['skipped']}")
        else:
            rows.append(f"{peer['name']:<36} {peer['tokens_per_second']:>8.1f} {peer['ratio_to_ar']:>6.2f}  "
                        f"{peer['token_identical_to_ar']}")
    return "\n".join(rows)
