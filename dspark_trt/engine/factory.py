"""The one place an engine is built: its runtime (torch, ONNX Runtime, TensorRT, or the BLS split across Triton
models), scheduler, calibration and tokenizer, from options (generate, bench, eval, profile, calibrate, and the
served `dspark_bls` model)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from dspark_trt.engine.engine import Engine
from dspark_trt.errors import DSparkError
from dspark_trt.models.weights import load_target
from dspark_trt.runtimes.base import Runtime
from dspark_trt.runtimes.bls_runtime import BlsRuntime, Call
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.scheduler import SCHEDULE_MODES


@dataclass
class EngineOptions:
    target: str = "smollm2"
    draft: str | None = None  # path to a DeepSpec checkpoint; None = no speculation
    engines: str | None = None  # an engine directory from build-engines: ONNX Runtime, or TensorRT if it has plans
    schedule: str = "fixed"
    gamma: int | None = None  # fixed mode: drafts verified per round (default: block size)
    threshold: float = 0.5  # threshold mode
    cost_table: str | None = None  # dspark / async modes
    calibration: str | None = None  # default: the one stored next to the drafter or in the engines, if any
    num_slots: int = 8
    max_seq_len: int = 2048
    max_batch_tokens: int = 512
    max_queue_size: int = 1024  # requests waiting for a slot before new ones are refused
    check_files: bool = False  # check the engine files against their manifest's sha256 first (served models do)
    device: str = "cpu"  # the torch runtime's models run here (e.g. "cuda"); engine directories pick their own


def build_engine(options: EngineOptions, call: Call | None = None) -> tuple[Engine, object]:
    """(engine, tokenizer) for the options; raises DSparkError naming a bad option.

    The runtime: with `call`, the BLS runtime reaching options.engines' graphs in the dspark_target/dspark_draft
    models through it; else over options.engines, TensorRT when the directory holds plans, ONNX Runtime
    otherwise; without engines, the torch reference on options.target and options.draft."""
    if options.schedule not in SCHEDULE_MODES:
        raise DSparkError(f"unknown schedule '{options.schedule}': choose from {', '.join(SCHEDULE_MODES)}")
    if options.engines is not None:
        runtime, tokenizer = _engine_dir_runtime(options, call)
    else:
        runtime, tokenizer = _torch_runtime(options)
    scheduler, temps = None, None
    if runtime.block_size > 0:
        from dspark_trt.graphs.manifest import engines_calibration
        from dspark_trt.models.drafter_checkpoint import stored_calibration
        from dspark_trt.spec.calibration import load_calibration
        from dspark_trt.spec.scheduler import make_scheduler

        calibration = options.calibration or stored_calibration(options.draft) or engines_calibration(options.engines)
        if calibration:
            temps = torch.as_tensor(load_calibration(calibration).temperatures)
        scheduler = make_scheduler(options.schedule, block_size=runtime.block_size, gamma=options.gamma,
                                   threshold=options.threshold, cost_table=options.cost_table,
                                   has_confidence=runtime.has_confidence_head)
    engine = Engine(runtime, scheduler, sts_temperatures=temps, max_batch_tokens=options.max_batch_tokens,
                    max_queue_size=options.max_queue_size,
                    detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    return engine, tokenizer


def _torch_runtime(options: EngineOptions) -> tuple[Runtime, object]:
    target, tokenizer = load_target(options.target)
    drafter = None
    if options.draft is not None and options.schedule != "off":
        from dspark_trt.models.drafter_checkpoint import load_drafter

        drafter = load_drafter(options.draft, target=target).to(options.device)
    return TorchRuntime(target.to(options.device), drafter, num_slots=options.num_slots,
                        max_seq_len=options.max_seq_len), tokenizer


def _engine_dir_runtime(options: EngineOptions, call: Call | None) -> tuple[Runtime, object]:
    """BlsRuntime over `call`; else TrtRuntime when the engine directory holds TensorRT plans (an error names
    what is missing where they cannot run), else OrtRuntime. With check_files, the files this process loads
    (all of them; with `call` the tokenizer only, the graphs are the models') are checked first."""
    from dspark_trt.graphs.integrity import check_engine_files
    from dspark_trt.graphs.manifest import load_engine_tokenizer, read_manifest

    manifest = (check_engine_files(options.engines, graphs=None if call is None else ()) if options.check_files
                else read_manifest(options.engines))
    kwargs = dict(num_slots=options.num_slots, max_seq_len=options.max_seq_len, use_drafter=options.schedule != "off")
    if call is not None:
        runtime = BlsRuntime(options.engines, call, **kwargs)
    elif manifest.get("plans"):
        from dspark_trt.runtimes.trt_runtime import TrtRuntime

        runtime = TrtRuntime(options.engines, **kwargs)
    else:
        from dspark_trt.runtimes.ort_runtime import OrtRuntime

        runtime = OrtRuntime(options.engines, **kwargs)
    return runtime, load_engine_tokenizer(options.engines)


def default_schedule(draft: str | None, engines: str | None) -> str:
    """The schedule when none is asked for: 'dspark' (Algorithm 1 with the draft gate, which decodes plainly
    where drafting cannot pay) for a drafter with a confidence head, 'fixed' for one without, 'off' for
    engines without a drafter."""
    if engines is not None:
        from dspark_trt.graphs.manifest import read_manifest

        return engines_schedule(read_manifest(engines))
    if draft is None:
        return "off"
    from dspark_trt.models.drafter_checkpoint import resolve_drafter

    try:
        confident = json.loads((resolve_drafter(draft) / "config.json").read_text())["enable_confidence_head"]
    except (OSError, ValueError, KeyError, TypeError):
        return "dspark"  # loading the drafter names what is wrong with its checkpoint
    return "dspark" if confident else "fixed"


def engines_schedule(manifest: dict) -> str:
    """default_schedule of an engine directory, from its manifest."""
    draft_info = manifest["draft"]
    if draft_info is None:
        return "off"
    return "dspark" if draft_info["confidence_head"] else "fixed"
