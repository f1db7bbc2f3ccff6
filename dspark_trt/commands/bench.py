"""Benchmarks, each a ratio measured side by side in one process:

  ar       our AR decode vs transformers generate (same prompt, same machine)
  speedup  batch-1 greedy DSpark vs AR on the same runtime, outputs checked token-identical
  served   tokens/s through a real tritonserver vs the in-process engine on the same engines
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark_trt.engine.prompts import read_prompts_file
from dspark_trt.errors import DSparkError

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    ar = sub.add_parser("ar", help="our AR decode vs transformers generate")
    ar.add_argument("--target", default="smollm2")
    ar.add_argument("--prompt", default=DEFAULT_PROMPT)
    ar.add_argument("--max-tokens", type=int, default=128)
    ar.add_argument("--repeats", type=int, default=3)
    speedup = sub.add_parser("speedup", help="batch-1 greedy DSpark vs AR on the same runtime")
    speedup.add_argument("--target", default="smollm2")
    speedup.add_argument("--draft", required=True)
    speedup.add_argument("--prompts-file", action="append", required=True)
    speedup.add_argument("--limit", type=int, default=5, help="prompts per file")
    speedup.add_argument("--max-tokens", type=int, default=128)
    speedup.add_argument("--schedule", default="fixed")
    served = sub.add_parser("served", help="tritonserver (HTTP generate) vs the in-process engine, concurrency 1")
    served.add_argument("--target", default="smollm2")
    served.add_argument("--draft", help="drafter directory (default: speculation off)")
    served.add_argument("--prompt", action="append", help="prompt text (repeatable; default: three built-in ones)")
    served.add_argument("--max-tokens", type=int, default=64)
    served.add_argument("--cache-dir", help="where engines and the repository are built (as for `serve`)")
    for p in (ar, speedup, served):
        p.add_argument("--json", action="store_true")
        p.add_argument("--out", help="also write the result JSON here")


def run(args: argparse.Namespace) -> int:
    progress = lambda msg: print(f"bench {args.benchmark}: {msg}", file=sys.stderr)  # noqa: E731
    if args.benchmark == "ar":
        from dspark_trt.bench.ar import bench_ar

        if args.max_tokens < 1 or args.repeats < 1:
            raise DSparkError("--max-tokens and --repeats must be >= 1")
        result = bench_ar(args.target, args.prompt, args.max_tokens, args.repeats, progress)
        summary = (f"ours {result['ours_tokens_per_second']:.1f} tok/s, transformers "
                   f"{result['transformers_tokens_per_second']:.1f} tok/s, ratio {result['ratio']:.2f}x, "
                   f"token-identical: {result['token_identical']}")
    elif args.benchmark == "speedup":
        from dspark_trt.bench.speedup import bench_speedup

        prompts = [p for f in args.prompts_file for p in read_prompts_file(f, args.limit)]
        result = bench_speedup(args.target, args.draft, prompts, args.max_tokens, args.schedule, progress)
        summary = (f"AR {result['ar_tokens_per_second']:.1f} tok/s, DSpark {result['dspark_tokens_per_second']:.1f} "
                   f"tok/s, speedup {result['speedup']:.2f}x, tau {result['mean_accepted_length']:.2f}, "
                   f"token-identical: {result['all_token_identical']}")
    elif args.benchmark == "served":
        from dspark_trt.bench.served import bench_served

        prompts = args.prompt or [DEFAULT_PROMPT, "List three uses of a paperclip.", "What is 17 times 23?"]
        result = bench_served(args.target, args.draft, prompts, args.max_tokens, args.cache_dir, progress)
        summary = (f"in-process {result['in_process_tokens_per_second']:.1f} tok/s, served "
                   f"{result['served_tokens_per_second']:.1f} tok/s, served/in-process {result['ratio']:.2f}, "
                   f"same text: {result['same_text']}")
    else:
        raise DSparkError("choose a benchmark: ar, speedup or served (see `dspark-trt bench --help`)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else summary)
    return 0
