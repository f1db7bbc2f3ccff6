"""Measure a drafter: τ, acceptance, per-position conditional acceptance and confidence calibration.

Runs every prompt of each dataset (JSONL lines {"turns": [...]}, first turn, chat template) through
the engine with per-round recording, by default verifying the full block every round (fixed γ =
block size) so every draft position is measured. Per dataset and over all of them: τ (committed
tokens per verification round, bonus included), the paper's acceptance rate, the accepted-length
histogram, P(position k accepted | positions < k accepted) (Fig. 2), tokens/s, and ECE/AUC/Brier of
the confidence head's prefix-survival predictions per position, raw and after STS when a calibration
is given (default: DRAFT/calibration.json if present). The results JSON records the exact command,
git revision, dataset sha256, target/drafter identity, machine and options, so runs can be reproduced.

`--engines DIR` evaluates the pair of a build-engines directory instead (its drafter and calibration, on ONNX
Runtime or TensorRT): the drafter as it is served, several times faster than the torch reference on a CPU. Its
τ is that of the quantized pair, so compare drafters on the same runtime.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from dspark_trt.cpu import cpu_model, kernel_flags
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.prompts import chat_prompt_ids, read_prompts_file
from dspark_trt.engine.request import SamplingParams
from dspark_trt.engine.rollouts import run_rollouts
from dspark_trt.errors import DSparkError
from dspark_trt.models.drafter_checkpoint import CALIBRATION_FILE, resolve_drafter, stored_calibration
from dspark_trt.spec.calibration import load_calibration
from dspark_trt.spec.eval_stats import Rounds, eval_stats, json_safe, rounds_from_requests
from dspark_trt.spec.scheduler import SCHEDULE_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2", help="alias, .gguf file or HF directory (default smollm2)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--draft", help="drafter directory (DeepSpec format), or 'default' for the shipped one: "
                                        "evaluated on the torch reference")
    source.add_argument("--engines", metavar="DIR", help="a build-engines directory with a drafter: its pair, as "
                                                          "served (ONNX Runtime, or TensorRT where it holds plans)")
    parser.add_argument("--datasets", nargs="+", required=True, metavar="FILE",
                        help="JSONL files of {'turns': [...]} lines; each is reported under its file stem")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="prompt i of a dataset samples with seed + i")
    parser.add_argument("--limit", type=int, help="first K prompts of each dataset")
    parser.add_argument("--schedule", choices=[m for m in SCHEDULE_MODES if m != "off"], default="fixed",
                        help="default fixed: verify the whole block every round, so every position is measured")
    parser.add_argument("--gamma", type=int, help="fixed schedule: drafts verified per round (default: block size)")
    parser.add_argument("--threshold", type=float, default=0.5, help="threshold schedule: confidence cut")
    parser.add_argument("--cost-table", help="cost table JSON from `dspark-trt profile` (dspark/async)")
    parser.add_argument("--calibration", help=f"STS calibration JSON (default: DRAFT/{CALIBRATION_FILE} if present)")
    parser.add_argument("--no-calibration", action="store_true", help="report raw confidences only")
    parser.add_argument("--concurrency", type=int, default=8, help="requests decoded at once")
    parser.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    parser.add_argument("--plot", metavar="DIR", help="write reliability_<dataset>.png and acceptance_<dataset>.png")
    parser.add_argument("--out", metavar="FILE", help="write the results JSON to FILE")


def run(args: argparse.Namespace) -> int:
    datasets = _read_datasets(args.datasets, args.limit)
    for name, value in (("--max-new-tokens", args.max_new_tokens), ("--concurrency", args.concurrency)):
        if value < 1:
            raise DSparkError(f"{name} must be >= 1, got {value}")
    manifest = None  # the engine directory's, read once
    if args.engines is not None:
        from dspark_trt.graphs.manifest import read_manifest

        manifest = read_manifest(args.engines)
        if manifest["draft"] is None:
            raise DSparkError(f"{args.engines}: the engines have no drafter to evaluate (build them with --draft)")
    elif not resolve_drafter(args.draft).is_dir():
        raise DSparkError(f"drafter directory not found: {args.draft}")
    calibration_path = _calibration_path(args, manifest)
    temps = torch.tensor(load_calibration(calibration_path).temperatures) if calibration_path else None

    engine, tokenizer = build_engine(EngineOptions(
        target=args.target, draft=args.draft, engines=args.engines, schedule=args.schedule, gamma=args.gamma,
        threshold=args.threshold, cost_table=args.cost_table,
        calibration=str(calibration_path) if calibration_path else None, num_slots=args.concurrency))
    gamma = engine.runtime.block_size
    if temps is not None and temps.numel() < gamma:
        raise DSparkError(f"calibration {calibration_path} has {temps.numel()} temperatures; the drafter's "
                          f"block size is {gamma}")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                            stop_ids=tuple(engine.runtime.eos_token_ids))

    # every dataset's prompts in one run, so the engine batches up to --concurrency of them at once
    labelled = [(name, chat_prompt_ids(tokenizer, p)) for name, (_, prompts, _) in datasets.items() for p in prompts]
    start = time.perf_counter()
    requests = run_rollouts(engine, [ids for _, ids in labelled], params, "eval")
    seconds = time.perf_counter() - start
    results, all_rounds = {}, []
    for name, (path, prompts, digest) in datasets.items():
        mine = [r for (label, _), r in zip(labelled, requests) if label == name]
        rounds = rounds_from_requests(mine, gamma)
        all_rounds.append(rounds)
        results[name] = {"path": str(path), "sha256": digest, "prompts": len(prompts),
                         "generated_tokens": sum(len(r.output_ids) for r in mine), **eval_stats(rounds, gamma, temps)}
        print(f"eval {name}: τ {results[name]['tau']:.3f} over {len(rounds)} rounds", file=sys.stderr, flush=True)
    totals = {"prompts": len(requests), "generated_tokens": sum(len(r.output_ids) for r in requests),
              "seconds": seconds}
    overall = Rounds.cat(all_rounds)
    if len(overall) == 0:
        raise DSparkError("no verification round happened: every prompt ended at its first token; "
                          "raise --max-new-tokens")
    report = json_safe({
        **_provenance(args, manifest, engine, calibration_path, temps),
        "datasets": results,
        "all": {**_throughput(totals), **eval_stats(overall, gamma, temps)},
    })
    if args.plot:
        _plot(report, Path(args.plot))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        _print_table(report)
    return 0


def _read_datasets(paths: list[str], limit: int | None) -> dict[str, tuple[Path, list[str], str]]:
    """name (file stem) -> (path, prompts, sha256 of the file); every problem is named before any model loads."""
    if limit is not None and limit < 1:
        raise DSparkError(f"--limit must be >= 1, got {limit}")
    datasets = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise DSparkError(f"dataset file not found: {path}")
        if path.stem in datasets:
            raise DSparkError(f"two datasets are named '{path.stem}' ({datasets[path.stem][0]} and {path}); "
                              "rename one")
        prompts = read_prompts_file(path, limit)
        if not prompts:
            raise DSparkError(f"dataset {path} has no prompts (expected JSONL lines {{\"turns\": [...]}})")
        datasets[path.stem] = (path, prompts, hashlib.sha256(path.read_bytes()).hexdigest())
    return datasets


def _calibration_path(args: argparse.Namespace, manifest: dict | None) -> Path | None:
    if args.no_calibration:
        if args.calibration:
            raise DSparkError("--calibration and --no-calibration contradict each other")
        return None
    if args.calibration:
        return Path(args.calibration)  # load_calibration names a missing or malformed file
    if args.engines is not None:
        from dspark_trt.graphs.manifest import engines_calibration

        return engines_calibration(args.engines, manifest)
    return stored_calibration(args.draft)


def _throughput(counts: dict) -> dict:
    """Throughput of the whole run (datasets are decoded together, so only the total has a time)."""
    seconds = counts["seconds"]
    return {**counts, "tokens_per_second": counts["generated_tokens"] / seconds if seconds > 0 else None}


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _provenance(args: argparse.Namespace, manifest: dict | None, engine, calibration_path: Path | None,
                temps: torch.Tensor | None) -> dict:
    """Everything needed to rerun this evaluation and to know what was measured where."""
    options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    target, draft = (_engine_pair(args.engines, manifest, engine) if manifest is not None
                     else _torch_pair(args.target, args.draft, engine))
    return {
        "command": shlex.join(["dspark-trt", *sys.argv[1:]]),
        "git_revision": _git_revision(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"hostname": platform.node(), "platform": platform.platform(), "processor": platform.machine(),
                    "cpu": cpu_model(), "cpu_flags": kernel_flags(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "runtime": "torch (CPU)" if manifest is None else engine.runtime.name},
        "target": target,
        "draft": draft,
        "calibration": None if calibration_path is None else {
            "path": str(calibration_path.resolve()), "sha256": hashlib.sha256(calibration_path.read_bytes()).hexdigest(),
            "temperatures": temps.tolist()},
        "options": options,
    }


def _config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _torch_pair(target_name: str, draft_name: str, engine) -> tuple[dict, dict]:
    """(target, draft) identities of the torch reference's pair."""
    from dspark_trt.models.sources import resolve_model

    draft = resolve_drafter(draft_name)
    return ({"name": target_name, "path": str(resolve_model(target_name).path),
             "config_sha256": _config_sha256(dataclasses.asdict(engine.runtime.target.config))},
            {"path": str(draft.resolve()), "block_size": engine.runtime.block_size,
             "config_sha256": hashlib.sha256((draft / "config.json").read_bytes()).hexdigest(),
             "weights_sha256": _sha256_files(list(draft.glob("*.safetensors")))})


def _engine_pair(engines: str, manifest: dict, engine) -> tuple[dict, dict]:
    """(target, draft) identities of an engine directory's pair, from its manifest (which holds each graph's
    sha256)."""
    graphs = {name: entry.get("sha256") for name, entry in manifest["graphs"].items()}
    target_info = {k: v for k, v in manifest["target"].items() if k != "config"}
    return ({"engines": str(Path(engines).resolve()), **target_info,
             "config_sha256": _config_sha256(manifest["target"]["config"]), "graph_sha256": graphs.pop("target")},
            {"engines": str(Path(engines).resolve()), "block_size": engine.runtime.block_size,
             "weights": manifest["draft"]["weights"], "config_sha256": _config_sha256(manifest["draft"]["config"]),
             "graph_sha256": graphs})


def _git_revision() -> str:
    """HEAD of the checkout this package runs from (+ '-dirty' with uncommitted changes), or 'unknown'."""
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _plot(report: dict, directory: Path) -> None:
    from dspark_trt.bench.eval_plots import acceptance_plot, reliability_diagram

    directory.mkdir(parents=True, exist_ok=True)
    for name, stats in [*report["datasets"].items(), ("all", report["all"])]:
        acceptance_plot(stats, name, directory / f"acceptance_{name}.png")
        if stats["calibration"] is not None:
            reliability_diagram(stats["calibration"], name, directory / f"reliability_{name}.png")


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _print_table(report: dict) -> None:
    print("dataset          prompts  rounds  tau    accept  tok/s   ECE raw  ECE STS  AUC")
    for name, s in [*report["datasets"].items(), ("all", report["all"])]:
        cal = s["calibration"] or {}
        before, after = cal.get("before") or {}, cal.get("after") or {}
        print(f"{name:<16} {s['prompts']:>7}  {s['rounds']:>6}  {_fmt(s['tau'], '.2f'):<5}  "
              f"{_fmt(s['acceptance_rate']):<6}  {_fmt(s.get('tokens_per_second'), '.1f'):<6}  "
              f"{_fmt(before.get('ece_mean')):<7}  {_fmt(after.get('ece_mean')):<7}  {_fmt(before.get('auc_mean'))}")
        print(f"{'':<16} conditional acceptance by position: "
              + " ".join(_fmt(v, '.2f') for v in s["conditional_acceptance"]))
