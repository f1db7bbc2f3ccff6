"""What keeping the drafter's context costs while the draft gate declines: the gated `dspark` schedule on
build-engines engines at C concurrent requests, with the engine's context_backlog at 1 (a `context` graph call
on every step a request does not draft: the engine before the backlog) and at its default (a block's rows),
alternating on the same engine and prompts, with the drafter's calls timed (docs/benchmarks.md).

    python scripts/context_backlog.py --engines ENGINES --cost-table COST.json --concurrency 1 8 \
        --prompts-file ../shared/data/eval/gsm8k.jsonl --limit 8 --max-tokens 64 --repeats 2 --out backlog.json
"""
from __future__ import annotations

import argparse
import json
import time

from dspark_trt.bench.common import environment
from dspark_trt.bench.load import digest
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.prompts import chat_prompt_ids, read_prompts_file
from dspark_trt.engine.request import SamplingParams


def timed(calls: dict, name: str, fn):
    """fn, counting its calls and seconds into calls[name]."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            calls[name]["calls"] += 1
            calls[name]["seconds"] += time.perf_counter() - started
    return wrapper


def run(engine, ids: list[list[int]], params: SamplingParams, backlog: int, calls: dict) -> dict:
    """All prompts at once through the engine (as many at a time as it has slots), drafter calls counted."""
    engine.context_backlog = backlog
    for part in calls.values():
        part.update(calls=0, seconds=0.0)
    steps = engine.steps
    started = time.perf_counter()
    outputs = engine.generate(ids, params)
    seconds = time.perf_counter() - started
    steps = engine.steps - steps
    tokens = sum(len(o.output_ids) for o in outputs)
    return {"context_backlog": backlog, "steps": steps, "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds, "outputs_digest": digest([o.output_ids for o in outputs]),
            **{f"{name}_calls": part["calls"] for name, part in calls.items()},
            **{f"{name}_ms_per_step": 1e3 * part["seconds"] / steps for name, part in calls.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True)
    parser.add_argument("--cost-table", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts-file", required=True)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    prompts = read_prompts_file(args.prompts_file, args.limit)
    results = []
    for concurrency in args.concurrency:
        engine, tokenizer = build_engine(EngineOptions(engines=args.engines, draft="default", schedule="dspark",
                                                       cost_table=args.cost_table, num_slots=concurrency))
        runtime = engine.runtime
        calls = {"extension": {}, "draft": {}}
        runtime.extend_context = timed(calls, "extension", runtime.extend_context)
        runtime.draft = timed(calls, "draft", runtime.draft)
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        params = SamplingParams(max_tokens=args.max_tokens, stop_ids=tuple(runtime.eos_token_ids))
        default = engine.context_backlog
        engine.generate([ids[0]], SamplingParams(max_tokens=8))  # warm-up
        for repeat in range(args.repeats):
            for backlog in ((1, default) if repeat % 2 == 0 else (default, 1)):
                row = {"concurrency": concurrency, "repeat": repeat, **run(engine, ids, params, backlog, calls)}
                results.append(row)
                print(f"C={concurrency} backlog={backlog}: {row['tokens_per_second']:.1f} tok/s, "
                      f"{row['extension_calls']} extension calls in {row['steps']} steps "
                      f"({row['extension_ms_per_step']:.2f} ms/step), {row['draft_calls']} drafts "
                      f"({row['draft_ms_per_step']:.2f} ms/step)", flush=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "context_backlog", "prompts_file": args.prompts_file, "limit": args.limit,
                   "max_tokens": args.max_tokens, "cost_table": args.cost_table, "results": results,
                   "environment": environment()}, f, indent=2)


if __name__ == "__main__":
    main()
