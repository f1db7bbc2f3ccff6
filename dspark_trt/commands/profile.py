"""Measure this runtime's cost table SPS(B) for the DSpark scheduler and write it as JSON."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.profiler import DEFAULT_BATCH_SIZES, profile_runtime
from dspark_trt.errors import DSparkError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--draft", help="drafter directory (to time draft passes too)")
    parser.add_argument("--engines", help="build-engines directory: profile the ONNX Runtime (or TensorRT) engines "
                                          "that will serve instead of the torch runtime")
    parser.add_argument("--out", required=True, help="where to write the cost table JSON")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="verification batch sizes B (tokens per target pass), comma separated")
    parser.add_argument("--context-len", type=int, default=256, help="cached tokens per request while timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the table as JSON too")


def run(args: argparse.Namespace) -> int:
    try:
        sizes = sorted({int(x) for x in args.batch_sizes.split(",") if x.strip()})
    except ValueError as exc:
        raise DSparkError(f"--batch-sizes must be integers, got {args.batch_sizes!r}") from exc
    if not sizes or sizes[0] < 1:
        raise DSparkError("--batch-sizes must be positive integers")
    options = EngineOptions(target=args.target, draft=args.draft, engines=args.engines,
                            num_slots=min(max(sizes), 16), max_seq_len=args.context_len + max(sizes) + 8)
    engine, _ = build_engine(options)
    table = profile_runtime(engine.runtime, sizes, args.context_len, args.repeats,
                            progress=lambda msg: print(f"profile: {msg}", file=sys.stderr))
    table.to_json(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        print(Path(args.out).read_text(), end="")  # the table as written, rows and metadata included
    return 0
