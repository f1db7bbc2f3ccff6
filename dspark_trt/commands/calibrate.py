"""Fit Sequential Temperature Scaling of the drafter's confidence head on held-out rollouts.

Runs full-block rounds (fixed schedule, no pruning) at the serving temperature over the given
prompts, fits one temperature per draft position (DSPARK_SPEC.md 5.2) and writes the calibration
JSON next to the drafter (or to --out). Use prompts held out from evaluation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.prompts import chat_prompt_ids, read_prompts_file
from dspark_trt.engine.request import SamplingParams
from dspark_trt.engine.rollouts import run_rollouts
from dspark_trt.errors import DSparkError
from dspark_trt.models.drafter_checkpoint import CALIBRATION_FILE, resolve_drafter
from dspark_trt.spec.calibration import Calibration, fit_sts, save_calibration
from dspark_trt.spec.eval_stats import rounds_from_requests
from dspark_trt.spec.metrics import calibration_metrics



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--draft", required=True, help="drafter directory (DeepSpec format)")
    parser.add_argument("--prompts", nargs="+", required=True, help="held-out JSONL prompt files ({'turns': [...]})")
    parser.add_argument("--limit", type=int, default=64, help="prompts per file")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="the serving temperature")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", help=f"calibration JSON (default: DRAFT/{CALIBRATION_FILE})")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    engine, tokenizer = build_engine(EngineOptions(target=args.target, draft=args.draft, schedule="fixed",
                                                   num_slots=args.concurrency))
    if not engine.runtime.has_confidence_head:
        raise DSparkError(f"drafter {args.draft} has no confidence head: nothing to calibrate")
    prompts = [p for path in args.prompts for p in read_prompts_file(path, args.limit)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            stop_ids=tuple(engine.runtime.eos_token_ids))
    requests = run_rollouts(engine, [chat_prompt_ids(tokenizer, p) for p in prompts], params, "calibrate")
    rounds = rounds_from_requests(requests, engine.runtime.block_size)
    if rounds.confidence_logits is None:
        raise DSparkError("no verification rounds were recorded; give more prompts or a larger --max-tokens")
    logits_t, accepted_t, proposed_t = rounds.confidence_logits, rounds.accepted, rounds.proposal_len
    temps = fit_sts(logits_t, accepted_t, proposed_t)
    before = calibration_metrics(logits_t, accepted_t, proposed_t)
    after = calibration_metrics(logits_t, accepted_t, proposed_t, temps)
    calibration = Calibration(
        temperatures=temps.tolist(),
        ece_before=[p["ece"] for p in before["positions"]], ece_after=[p["ece"] for p in after["positions"]],
        metadata={"rounds": len(rounds), "prompts": len(prompts), "temperature": args.temperature,
                  "prompt_files": [str(p) for p in args.prompts], "target": args.target, "draft": str(args.draft)},
    )
    out = Path(args.out) if args.out else resolve_drafter(args.draft) / CALIBRATION_FILE
    save_calibration(calibration, out)
    report = {"calibration": str(out), "rounds": len(rounds), "temperatures": temps.tolist(),
              "positions": [{"position": k + 1, "count": b["count"], "ece_before": b["ece"], "ece_after": a["ece"],
                             "auc": b["auc"]} for k, (b, a) in enumerate(zip(before["positions"], after["positions"]))]}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {out} from {len(rounds)} rounds")
        print("position  count  ECE before  ECE after  AUC    T")
        for row, t in zip(report["positions"], report["temperatures"]):
            print(f"{row['position']:>8}  {row['count']:>5}  {row['ece_before']:>10.4f}  {row['ece_after']:>9.4f}  "
                  f"{row['auc']:.3f}  {t:.2f}")
    return 0
