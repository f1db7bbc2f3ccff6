"""Turn an engine directory (from `dspark-trt build-engines`) into a Triton model repository:
ensemble -> preprocessing -> dspark_bls (decoupled engine loop) -> postprocessing."""
from __future__ import annotations

import argparse

from dspark_trt.spec.scheduler import SCHEDULE_MODES
from dspark_trt.serving.package import PackageOptions, package_repository


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engines", required=True, help="engine directory written by build-engines")
    parser.add_argument("--out", required=True, help="model repository to write (must not exist or be empty)")
    parser.add_argument("--schedule", choices=SCHEDULE_MODES,
                        help="verification schedule ('off' serves the target alone; default: dspark with the draft "
                        "gate for a drafter with a confidence head, as generate and serve)")
    parser.add_argument("--block-size", type=int,
                        help="fixed schedule: drafts verified per round (default: the drafter's block size)")
    parser.add_argument("--cost-table", help="cost table JSON from `dspark-trt profile` (dspark/async; default: the one "
                        "cached for these engines on this machine, profiled on first use)")
    parser.add_argument("--calibration", help="STS calibration JSON from `dspark-trt calibrate` (default: the "
                        "drafter's, stored in the engines)")
    parser.add_argument("--num-slots", type=int, default=8, help="requests decoded at once (KV slots)")
    parser.add_argument("--max-batch-tokens", type=int, help="tokens per target pass (default: the engines')")
    parser.add_argument("--max-queue-size", type=int, default=1024, help="waiting requests before refusing")


def run(args: argparse.Namespace) -> int:
    out = package_repository(PackageOptions(
        engines=args.engines, out=args.out, schedule=args.schedule, block_size=args.block_size,
        cost_table=args.cost_table, calibration=args.calibration, num_slots=args.num_slots,
        max_batch_tokens=args.max_batch_tokens, max_queue_size=args.max_queue_size))
    print(f"wrote model repository {out}; serve it with: dspark-trt serve --repo {out}")
    return 0
