"""Fill the `triton_repo/` templates into a Triton model repository for one engine directory.

Templates are `config.pbtxt` files with `${name}` fields (string.Template) plus each python model's
`1/model.py`, copied as is. The engine directory is referenced by absolute path, not copied (the
default target's graphs are hundreds of MB). Every option is checked here, against the engine
manifest, so a bad one fails at package time and not when tritonserver loads the model.
"""
from __future__ import annotations

import dataclasses
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dspark_trt.errors import DSparkError
from dspark_trt.serving.ensemble import ensemble_steps

TEMPLATES = Path(__file__).resolve().parents[2] / "triton_repo"
ENTRY_MODEL = "ensemble"  # the model clients call
MODELS = (ENTRY_MODEL, "preprocessing", "dspark_bls", "dspark_target", "dspark_draft", "postprocessing")
# One prompt per request, as TensorRT-LLM's clients send ([1, 1] tensors); concurrency comes from the
# engine's in-flight batching, not from Triton batches.
MAX_BATCH_SIZE = 1


@dataclass
class PackageOptions:
    engines: str
    out: str
    schedule: str | None = None  # default: default_schedule's for the engines; "off" serves the target alone
    block_size: int | None = None  # drafts verified per round with the fixed schedule (default: drafter's block)
    cost_table: str | None = None  # default for dspark/async: the one cached for these engines on this machine
    calibration: str | None = None  # default: the drafter's, copied into the engines by build-engines
    num_slots: int = 8
    max_batch_tokens: int | None = None  # default: the engines' own
    max_queue_size: int = 1024


def package_repository(options: PackageOptions, log: Callable[[str], None] = print) -> Path:
    """Write the model repository options.out (which must not exist or be empty); returns its path. What the
    options leave open is filled the way `generate` and `serve` fill it (resolve_defaults), and `log` says how."""
    from dspark_trt.graphs.manifest import read_manifest

    engines = Path(options.engines).resolve()
    manifest = read_manifest(engines)
    if not (engines / "tokenizer").is_dir():
        raise DSparkError(f"{engines}: no tokenizer/ directory (rebuild it with `dspark-trt build-engines`)")
    out = Path(options.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DSparkError(f"--out {out} already exists and is not an empty directory")
    _check_values(options)
    options = resolve_defaults(options, manifest, log)  # after the cheap checks: it may profile
    _check_speculation(options, manifest)
    fields = {
        "max_batch_size": MAX_BATCH_SIZE,
        "engine_dir": engines,
        "tokenizer_dir": engines / "tokenizer",
        "schedule": options.schedule if manifest["draft"] is not None else "off",
        "gamma": options.block_size if options.block_size is not None else "",
        "cost_table": Path(options.cost_table).resolve() if options.cost_table else "",
        "calibration": Path(options.calibration).resolve() if options.calibration else "",
        "num_slots": options.num_slots,
        "max_batch_tokens": options.max_batch_tokens or manifest.get("max_batch_tokens") or 512,
        "max_queue_size": options.max_queue_size,
    }
    speculate = fields["schedule"] != "off"
    for model in MODELS:
        if model == "dspark_draft" and not speculate:
            continue  # target alone: nothing for a drafter model to load
        source = TEMPLATES / model
        template = string.Template((source / "config.pbtxt").read_text())
        try:
            config = template.substitute({k: _pbtxt_string(str(v)) for k, v in fields.items()}
                                         | {"ensemble_steps": ensemble_steps()})
        except (KeyError, ValueError) as exc:
            raise DSparkError(f"template {source / 'config.pbtxt'}: bad or unknown field {exc}") from exc
        (out / model / "1").mkdir(parents=True, exist_ok=True)
        (out / model / "config.pbtxt").write_text(config)
        if (source / "1" / "model.py").is_file():
            shutil.copy2(source / "1" / "model.py", out / model / "1" / "model.py")
    return out


def resolve_defaults(options: PackageOptions, manifest: dict, log: Callable[[str], None]) -> PackageOptions:
    """options with the schedule (dspark for a drafter with a confidence head), for dspark/async the cost table
    cached for these engines on this machine (profiled on first use) and the engines' calibration filled in;
    `log` hears what was filled in (nothing, for options resolved before)."""
    from dspark_trt.engine.factory import EngineOptions, engines_schedule
    from dspark_trt.graphs.manifest import engines_calibration
    from dspark_trt.spec.scheduler import COST_AWARE_MODES

    filled = options.schedule is None
    options = dataclasses.replace(options, schedule=options.schedule or engines_schedule(manifest))
    if manifest["draft"] is None or options.schedule == "off":
        return options
    said = [f"schedule {options.schedule}"]
    if options.schedule in COST_AWARE_MODES:
        said[0] += " with the draft gate (steps where drafting cannot pay decode plainly)"
        if options.cost_table is None:
            from dspark_trt.engine.cost_cache import default_cost_table

            cached = default_cost_table(EngineOptions(engines=options.engines), log=log)
            options.cost_table, filled = str(cached.path), True
            said.append(cached.describe())
        else:
            said.append(f"cost table {options.cost_table} (--cost-table)")
    if options.calibration is None:
        stored = engines_calibration(options.engines, manifest)
        options.calibration, filled = (str(stored), True) if stored else (None, filled)
    if options.calibration:
        said.append(f"calibration {options.calibration}")
    if filled:
        log("; ".join(said))
    return options


def _check_values(options: PackageOptions) -> None:
    for name in ("num_slots", "max_queue_size"):
        if getattr(options, name) < 1:
            raise DSparkError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    if options.max_batch_tokens is not None and options.max_batch_tokens < 1:
        raise DSparkError(f"--max-batch-tokens must be >= 1, got {options.max_batch_tokens}")
    for name in ("cost_table", "calibration"):
        path = getattr(options, name)
        if path and not Path(path).is_file():
            raise DSparkError(f"--{name.replace('_', '-')} {path} does not exist")


def _check_speculation(options: PackageOptions, manifest: dict) -> None:
    from dspark_trt.spec.scheduler import make_scheduler

    draft = manifest["draft"]
    if draft is None:
        if options.schedule not in ("off", "fixed") or options.block_size or options.cost_table or options.calibration:
            raise DSparkError("the engines have no drafter: speculation options need engines built with --draft")
        return
    make_scheduler(options.schedule, block_size=draft["block_size"], gamma=options.block_size,
                   cost_table=options.cost_table, has_confidence=draft["confidence_head"])
    if options.calibration:
        from dspark_trt.spec.calibration import load_calibration

        load_calibration(options.calibration)


def _pbtxt_string(value: str) -> str:
    """value inside a double-quoted pbtxt string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')
