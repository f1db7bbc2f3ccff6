"""The build-engines job: load, export, check, validate, copy the tokenizer, write the manifest.

Each step reports progress; a failure is raised as a DSparkError naming the step and the graph. The
TensorRT backend needs the `tensorrt` package (NVIDIA GPU hosts only) and fails up front without it.
"""
from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from dspark_trt.build.validate import failures, validate_engines
from dspark_trt.errors import DSparkError
from dspark_trt.export.engines import export_engines
from dspark_trt.export.fused_target import LM_HEADS, fused_supported
from dspark_trt.export.tensorrt_build import build_plans, require_tensorrt
from dspark_trt.export.weight_quant import WEIGHT_FORMATS
from dspark_trt.graphs.manifest import CALIBRATION, sha256, write_manifest

BACKENDS = ("onnxruntime", "tensorrt")
DTYPES = ("float32",)
WEIGHTS = ("int4", "fp32")
STEPS = ("load", "export", "check", "validate", "tokenizer", "manifest")


@dataclass
class BuildOptions:
    out: str
    target: str = "smollm2"
    draft: str | None = None
    backend: str = "onnxruntime"
    dtype: str = "float32"  # activations
    weights: str | None = None  # None: default_weights()
    accuracy_level: int = 4  # int4 MatMulNBits compute: 4 = int8 activations (batch-invariant), 1 = float32
    draft_weights: str | None = None  # None: int8 on ONNX Runtime (integer GEMM), fp32 on TensorRT
    lm_head: str = "gguf"  # the fused graph's LM head: the GGUF's blocks, or float32 (faster for large batches)
    max_seq_len: int | None = None  # None: min(2048, the target's max positions)
    max_batch_tokens: int = 512
    tolerance: float = 1e-3  # max abs error allowed, relative to max(1, the reference's magnitude)


def default_weights(fused: bool, target: str) -> str:
    """int4 for a GGUF target's fused graph (ONNX Runtime's, or TensorRT's flavour of it: its own blocks),
    else fp32 (an HF directory's float weights; the portable graph)."""
    from dspark_trt.models.sources import resolve_model

    return "int4" if fused and resolve_model(target).kind == "gguf" else "fp32"


def _stderr(message: str) -> None:
    print(f"build-engines: {message}", file=sys.stderr, flush=True)


@contextmanager
def _step(name: str, progress: Callable[[str], None], graph: str | None = None):
    progress(f"[{STEPS.index(name) + 1}/{len(STEPS)}] {name}" + (f" ({graph})" if graph else ""))
    where = f"step '{name}'" + (f", graph '{graph}'" if graph else "")
    try:
        yield
    except DSparkError as exc:
        raise DSparkError(f"{where}: {exc}") from exc
    except Exception as exc:  # exporter/checker/ORT errors: name where they happened, keep the cause
        raise DSparkError(f"{where}: {type(exc).__name__}: {exc}") from exc


def check_options(options: BuildOptions) -> None:
    """Reject bad options before any slow work."""
    if options.backend not in BACKENDS:
        raise DSparkError(f"unknown backend '{options.backend}': choose from {', '.join(BACKENDS)}")
    if options.backend == "tensorrt":
        require_tensorrt()
    if options.lm_head not in LM_HEADS:
        raise DSparkError(f"unknown LM head '{options.lm_head}': choose from {', '.join(LM_HEADS)}")
    if options.weights is not None and options.weights not in WEIGHTS:
        raise DSparkError(f"unknown weights '{options.weights}': choose from {', '.join(WEIGHTS)}")
    if options.draft_weights is not None and options.draft_weights not in WEIGHT_FORMATS:
        raise DSparkError(f"unknown draft weights '{options.draft_weights}': choose from {', '.join(WEIGHT_FORMATS)}")
    if options.accuracy_level not in (1, 4):
        raise DSparkError(f"--accuracy-level must be 1 (float32 compute) or 4 (int8 activations), "
                          f"got {options.accuracy_level}")
    if options.dtype not in DTYPES:
        raise DSparkError(f"dtype '{options.dtype}' is not supported: the exported graphs are {', '.join(DTYPES)}")
    if options.max_seq_len is not None and options.max_seq_len < 16:
        raise DSparkError(f"--max-seq-len must be at least 16, got {options.max_seq_len}")
    if options.max_batch_tokens < 1:
        raise DSparkError(f"--max-batch-tokens must be positive, got {options.max_batch_tokens}")


def build_engines(options: BuildOptions, progress: Callable[[str], None] = _stderr) -> dict:
    """Build the engine directory options.out; returns its manifest."""
    from dspark_trt.models.weights import load_target
    from dspark_trt.runtimes.torch_runtime import TorchRuntime

    check_options(options)
    out = Path(options.out)
    with _step("load", progress, "target"):
        target, tokenizer = load_target(options.target)
        limit = target.config.max_position_embeddings
        if options.max_seq_len is not None and options.max_seq_len > limit:
            raise DSparkError(f"--max-seq-len {options.max_seq_len} exceeds the target's max_position_embeddings {limit}")
        max_seq_len = options.max_seq_len or min(2048, limit)
    drafter = None
    if options.draft is not None:
        with _step("load", progress, "draft"):
            from dspark_trt.models.drafter_checkpoint import load_drafter

            drafter = load_drafter(options.draft, target=target)
            TorchRuntime(target, drafter, num_slots=1, max_seq_len=1)  # checks the pair fits
    with _step("export", progress):
        trt = options.backend == "tensorrt"  # the fused contract in TensorRT's operators (export/trt_target.py)
        fused = not trt and fused_supported(target.config)
        weights = options.weights or default_weights(fused or trt, options.target)
        if weights == "int4" and not (fused or trt):
            raise DSparkError("--weights int4 needs the fused ONNX Runtime graph, which this target cannot use "
                              f"(GroupQueryAttention needs a head size divisible by 16, got {target.config.head_dim})")
        if options.lm_head != "gguf" and not fused:
            raise DSparkError(f"--lm-head {options.lm_head} is an option of the fused ONNX Runtime graph")
        if not fused and options.backend == "onnxruntime":
            progress(f"      head size {target.config.head_dim} is not a multiple of 16: the portable graph")
        manifest = export_engines(target, drafter, out, progress=lambda m: progress(f"      {m}"),
                                  graph="trt" if trt else "fused" if fused else "portable", weights=weights,
                                  source=options.target, max_seq_len=max_seq_len,
                                  accuracy_level=options.accuracy_level,
                                  draft_weights=options.draft_weights or ("fp32" if trt else "int8"),
                                  lm_head=options.lm_head)
    for name, graph in manifest["graphs"].items():
        with _step("check", progress, name):
            onnx.checker.check_model(str(out / graph["file"]), full_check=True)  # full: strict shape inference
    with _step("validate", progress):
        if trt:  # on ONNX Runtime, TensorRT's KV-cache update and attention emulated (plugins/trt_ops_ort.py)
            from dspark_trt.build.validate_trt import validate_trt_engines

            report = validate_trt_engines(out, target, drafter)
        else:
            report = validate_engines(out, target, drafter)
        for key, entry in report.items():
            if isinstance(entry, dict):
                kl = (f", mean KL {entry['mean_kl']:.3g}, argmax agreement {entry['top1_agreement']:.3f}"
                      if "mean_kl" in entry else "")
                progress(f"      {key}: max abs error {entry['max_abs_error']:.3g} (scale {entry['scale']:.3g}){kl}")
        problems = failures(report, options.tolerance)
        if problems:
            raise DSparkError("ONNX Runtime disagrees with torch: " + "; ".join(problems))
    with _step("tokenizer", progress):
        tokenizer.save_pretrained(str(out / "tokenizer"))
        files = sorted(p for p in (out / "tokenizer").iterdir() if p.is_file())
    calibration = _copy_calibration(options.draft, out)
    with _step("manifest", progress):
        manifest.update({
            "sources": {"target": options.target, "draft": options.draft},
            "dtype": options.dtype, "max_seq_len": max_seq_len,
            "max_batch_tokens": options.max_batch_tokens,
            "validation": {"tolerance": options.tolerance, "results": report},
            "tokenizer": {"files": [{"file": p.relative_to(out).as_posix(), "sha256": sha256(p)} for p in files]},
            "calibration": calibration,
        })
        write_manifest(out, manifest)
    if options.backend == "tensorrt":
        manifest = build_plans(out, manifest, options.max_batch_tokens, progress=progress)
    progress(f"wrote {out / 'manifest.json'}")
    return manifest


def _copy_calibration(draft: str | None, out: Path) -> dict | None:
    """The drafter's stored STS calibration travels with its engines (generate --engines, package and serve
    read it from there); its manifest entry, or None when the drafter has none."""
    from dspark_trt.models.drafter_checkpoint import stored_calibration

    stored = stored_calibration(draft)
    if stored is None:
        return None
    shutil.copyfile(stored, out / CALIBRATION)
    return {"file": CALIBRATION, "sha256": sha256(out / CALIBRATION)}
