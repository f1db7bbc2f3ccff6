"""Where a batch-1 speculative round's time goes on build-engines engines: plain decoding and fixed γ rounds on the
same prompts, one after another in one process, each under cProfile, with the time of the engine's steps split into
the target pass, the draft pass and the rest (docs/benchmarks.md, issue #19). It checks the cost table's
prediction for a round (draft pass + verification of γ + 1 tokens) against what a round costs in the engine.

    python scripts/round_cost.py --engines ENGINES --gammas 1 3 --prompts-file ../shared/data/eval/gsm8k.jsonl \
        --limit 2 --max-tokens 64 --out round_cost.json
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

from dspark_trt.bench.common import environment
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.prompts import chat_prompt_ids, read_prompts_file
from dspark_trt.engine.request import SamplingParams

# the runtime calls a round is made of, as cProfile names them (function name, file)
PARTS = {"target pass": ("target_verify", "ort_runtime.py"), "draft pass": ("draft", "ort_runtime.py"),
         "drafter context": ("extend_context", "ort_runtime.py"), "prefill": ("_prefill", "engine.py")}


def run_schedule(engines: str, prompts: list[str], max_tokens: int, gamma: int | None) -> dict:
    """Decode every prompt alone under one schedule (gamma None: plain decoding) and split the time."""
    options = EngineOptions(target="smollm2", draft="default", engines=engines, num_slots=1,
                            schedule="off" if gamma is None else "fixed", gamma=gamma)
    engine, tokenizer = build_engine(options)
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, stop_ids=tuple(engine.runtime.eos_token_ids))
    engine.generate([ids[0]], SamplingParams(max_tokens=8))  # warm-up
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    outputs = [engine.generate([i], params)[0] for i in ids]
    profile.disable()
    seconds = time.perf_counter() - started
    stats = pstats.Stats(profile).stats
    parts = {}
    for part, (name, filename) in PARTS.items():
        hits = [(calls, cumulative) for (file, _, fn), (_, calls, _, cumulative, _) in stats.items()
                if fn == name and file.endswith(filename)]
        parts[part] = {"calls": sum(c for c, _ in hits), "seconds": sum(s for _, s in hits)}
    tokens = sum(len(o.output_ids) for o in outputs)
    decode_seconds = seconds - parts["prefill"]["seconds"]
    return {"gamma": gamma, "tokens": tokens, "seconds": seconds, "rounds": parts["target pass"]["calls"],
            "decode_tokens_per_second": (tokens - len(ids)) / decode_seconds, "parts": parts,
            "other_seconds": decode_seconds - sum(parts[p]["seconds"] for p in PARTS if p != "prefill")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True)
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--prompts-file", required=True)
    parser.add_argument("--limit", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    prompts = read_prompts_file(args.prompts_file, args.limit)
    runs = [run_schedule(args.engines, prompts, args.max_tokens, gamma) for gamma in [None, *args.gammas]]
    plain = runs[0]["decode_tokens_per_second"]
    for run in runs:
        rounds = max(run["rounds"], 1)  # decode steps: one target pass each
        split = ", ".join(f"{part} {1e3 * v['seconds'] / rounds:.1f}" for part, v in run["parts"].items()
                          if part != "prefill")
        print(f"{'plain' if run['gamma'] is None else 'fixed γ = %d' % run['gamma']:12s} "
              f"{run['decode_tokens_per_second']:6.1f} decode tok/s ({run['decode_tokens_per_second'] / plain:.2f}x "
              f"plain), ms per round: {split}, rest {1e3 * run['other_seconds'] / rounds:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"engines": args.engines, "prompts_file": args.prompts_file, "limit": args.limit,
                       "max_tokens": args.max_tokens, "runs": runs, "environment": environment()}, f, indent=1)


if __name__ == "__main__":
    main()
