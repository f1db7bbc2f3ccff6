"""Batch-1 greedy speedup of DSpark over AR on the same runtime: per prompt, AR and DSpark runs are
interleaved in one process, outputs are checked token-identical, τ is reported."""
from __future__ import annotations

from dspark_trt.bench.common import environment, timed
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.models.drafter_checkpoint import load_drafter
from dspark_trt.models.weights import load_target
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.scheduler import make_scheduler


def bench_speedup(target: str, draft: str, prompts: list[str], max_tokens: int, schedule: str = "fixed",
                  progress=lambda msg: None) -> dict:
    model, tokenizer = load_target(target)
    drafter = load_drafter(draft, target=model)
    stop = tuple(model.config.eos_token_ids)
    params = SamplingParams(max_tokens=max_tokens, stop_ids=stop)
    ar = Engine(TorchRuntime(model, num_slots=1))
    spec_runtime = TorchRuntime(model, drafter, num_slots=1)
    spec = Engine(spec_runtime, make_scheduler(schedule, spec_runtime.block_size,
                                               has_confidence=spec_runtime.has_confidence_head))
    warm = chat_prompt_ids(tokenizer, "Hello")
    ar.generate([warm], SamplingParams(max_tokens=4))
    spec.generate([warm], SamplingParams(max_tokens=4))
    rows, ar_tokens, ar_seconds, spec_tokens, spec_seconds, taus = [], 0, 0.0, 0, 0.0, []
    for i, prompt in enumerate(prompts):
        ids = chat_prompt_ids(tokenizer, prompt)
        a, a_s = timed(lambda: ar.generate([ids], params)[0])
        s, s_s = timed(lambda: spec.generate([ids], params)[0])
        ar_tokens += len(a.output_ids)
        ar_seconds += a_s
        spec_tokens += len(s.output_ids)
        spec_seconds += s_s
        taus += s.stats.accepted_lengths
        rows.append({"prompt": i, "tokens": len(a.output_ids), "identical": a.output_ids == s.output_ids,
                     "ar_tokens_per_second": len(a.output_ids) / a_s, "dspark_tokens_per_second": len(s.output_ids) / s_s,
                     "mean_accepted_length": s.stats.mean_accepted_length})
        progress(f"prompt {i + 1}/{len(prompts)}: AR {rows[-1]['ar_tokens_per_second']:.1f} tok/s, DSpark "
                 f"{rows[-1]['dspark_tokens_per_second']:.1f} tok/s, tau {s.stats.mean_accepted_length:.2f}")
    ar_tps, spec_tps = ar_tokens / ar_seconds, spec_tokens / spec_seconds
    return {"benchmark": "speedup", "target": target, "draft": str(draft), "schedule": schedule,
            "prompts": len(prompts), "max_tokens": max_tokens, "ar_tokens_per_second": ar_tps,
            "dspark_tokens_per_second": spec_tps, "speedup": spec_tps / ar_tps,
            "mean_accepted_length": sum(taus) / len(taus) if taus else None,
            "all_token_identical": all(r["identical"] for r in rows), "per_prompt": rows,
            "environment": environment()}
