"""Writing an engine directory: the exported graphs of a target (and drafter) plus `manifest.json` describing
them (what the manifest holds, and reading it: graphs/manifest.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from dspark_trt import __version__
from dspark_trt.errors import DSparkError
from dspark_trt.export.draft_graph import export_drafter
from dspark_trt.export.fused_target import export_fused_target
from dspark_trt.export.target_graph import OPSET, export_target
from dspark_trt.graphs.manifest import FORMAT, sha256, write_manifest
from dspark_trt.graphs.verify_tail import VERIFY_NODE
from dspark_trt_plugins import ort_op


def graph_io(path: Path) -> dict:
    """Names, shapes (symbolic dims by name) and element types of a graph's inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        return [{"name": v.name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values]

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def versions() -> dict[str, str]:
    import onnxruntime
    import onnxruntime_extensions
    import torch

    return {"dspark_trt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxruntime_extensions": onnxruntime_extensions.__version__,
            "opset": str(OPSET)}


def graph_entry(path: Path, out_dir: Path) -> dict:
    """A graph's file, I/O and hash; a graph with external weights (`<file>.data`) lists and hashes them."""
    entry = {"file": path.relative_to(out_dir).as_posix(), **graph_io(path), "sha256": sha256(path)}
    data = path.with_suffix(".onnx.data")
    if data.is_file():
        entry["data"] = {"file": data.relative_to(out_dir).as_posix(), "sha256": sha256(data),
                         "bytes": data.stat().st_size}
    return entry


def export_engines(target, drafter, out_dir: str | Path, progress=lambda message: None, verify: bool = True,
                   graph: str = "portable", weights: str = "fp32", source: str | None = None,
                   max_seq_len: int = 2048, accuracy_level: int = 4, draft_weights: str = "fp32",
                   lm_head: str = "gguf") -> dict:
    """Export target (with the drafter's taps; verify: ending in DSparkVerify) and drafter graphs into
    out_dir and write the manifest.

    graph: "fused" (ONNX Runtime's fused LLM operators, weights "int4" from the GGUF `source`'s blocks
    or "fp32"; lm_head "gguf" or "fp32", export/fused_target.py), "trt" (the same contract for TensorRT:
    blocked DequantizeLinear, TensorRT's KV-cache update and attention; weights "int4" or "fp32") or
    "portable" (standard ONNX, float32).
    """
    from dspark_trt.models.drafter_checkpoint import config_to_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taps = list(drafter.config.target_layer_ids) if drafter is not None else []
    progress(f"exporting target graph ({graph}, {weights} weights)")
    if graph == "fused":
        path, target_report = export_fused_target(source, target, out_dir / "target.onnx", max_seq_len, taps,
                                                  weights=weights, accuracy_level=accuracy_level, verify=verify,
                                                  lm_head=lm_head)
    elif graph == "trt":  # the TensorRT flavour of the fused graph's contract (export/trt_target.py)
        from dspark_trt.export.trt_target import export_trt_target

        path, target_report = export_trt_target(source, target, out_dir / "target.onnx", max_seq_len, taps,
                                                weights=weights, verify=verify)
    elif graph == "portable" and weights == "fp32":
        path = export_target(target, out_dir / "target.onnx", tap_layers=taps, verify=verify)
        target_report = {"weights": "fp32"}
    else:
        raise DSparkError(f"the {graph} target graph takes fp32 weights, not {weights}")
    paths = {"target": path}
    if drafter is not None:
        progress("exporting drafter graphs")
        paths.update(export_drafter(drafter, out_dir, weights=draft_weights))
    manifest = {
        "format": FORMAT,
        "backend": "onnxruntime",
        "dtype": "float32",
        "target": {"config": dataclasses.asdict(target.config), "graph": graph, **target_report},
        "draft": None if drafter is None else {
            "config": config_to_dict(drafter.config), "block_size": drafter.config.block_size,
            "mask_token_id": drafter.config.mask_token_id,
            "markov_head_type": drafter.config.markov_head_type,
            "confidence_head": drafter.config.enable_confidence_head, "weights": draft_weights,
            **({"draft_vocab_size": drafter.config.draft_vocab_size} if drafter.config.reduced_vocab else {})},
        "taps": taps,
        "verify": None if not verify else {
            "graph": "target", "node": VERIFY_NODE, "op": f"{ort_op.DOMAIN}::{ort_op.OP_TYPE}",
            "library": "onnxruntime-extensions (dspark_trt_plugins.ort_op)", "schema": "plugins/SCHEMA.md"},
        "graphs": {name: graph_entry(path, out_dir) for name, path in paths.items()},
        "versions": versions(),
    }
    write_manifest(out_dir, manifest)
    return manifest
