"""TensorRT plans from the exported ONNX graphs (`build-engines --backend tensorrt`, NVIDIA GPU hosts only).

`build-engines --backend tensorrt` exports the TensorRT flavour of the target graph (export/trt_target.py:
the fused graph's contract with blocked DequantizeLinear weights, TRT_KVCacheUpdate / TRT_Attention and
the DSparkVerify node) and the drafter graphs, validates them on ONNX Runtime, then compiles each into a
plan here. TensorRT 11 networks are strongly typed: precision comes from the ONNX tensor types (int4/int8
weights dequantized to float32, float32 activations), so there is no FP16/INT8 builder flag to set;
float32 graphs additionally clear TF32 so the plans compute what ONNX Runtime was validated on.

The parser gets a copy of each graph (`tensorrt_graph`): the nodes that ONNX Runtime runs as custom ops of
its `ai.onnx.contrib` domain become the nodes TensorRT's parser reads (DSparkVerify: default domain with
plugin fields; TRT_KVCacheUpdate / TRT_Attention: domain `trt`, attn_mask slot restored). Every dynamic
dimension of a graph input is named in the manifest ("tokens", "batch", "query", ...); `dim_bounds` gives
each name its (min, opt, max) from the build options and `profile_shapes` turns a graph's manifest I/O
into one optimization profile (the caches' capacity is static). These are pure and tested on CPU; only
`build_plans` touches TensorRT, which is imported when it runs (it never ran here: no GPU, no TensorRT).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import onnx
from onnx import helper

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.manifest import sha256, write_manifest
from dspark_trt_plugins import trt_ops_ort
from dspark_trt_plugins.trt_plugin import PLUGIN_ID

TENSORRT_MISSING = ("TensorRT is not installed; --backend tensorrt needs the `tensorrt` package and an NVIDIA GPU "
                    "with CUDA; the onnxruntime backend works on CPU")
MAX_REQUESTS = 64  # requests per pass the plans accept (the engine's slots); bounds the padded attention
PRECISION_FLAGS = {"float32": {"clear": ["TF32"]}}  # builder flags per exported dtype (strong typing: no others)

PLUGIN_NAMESPACE, VERIFY_OP = PLUGIN_ID.split("::")  # the ONNX op type and the plugin's namespace

Shape = tuple[int, ...]


def require_tensorrt() -> None:
    """Fail fast, before any export work, where TensorRT plans cannot be built."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise DSparkError(TENSORRT_MISSING) from None
    import torch

    if not torch.cuda.is_available():
        raise DSparkError("tensorrt is installed but no CUDA GPU is visible; TensorRT plans are built on the GPU "
                          "they run on (the onnxruntime backend works on CPU)")


def dim_bounds(max_batch_tokens: int, max_seq_len: int, max_requests: int, block_size: int) -> dict[str, Shape]:
    """(min, opt, max) of every named dynamic dimension. opt is a decode step: every request verifying a
    block (block_size drafts + the anchor) over a half-full context."""
    requests = min(max_requests, max_batch_tokens)
    step = min(block_size + 1, max_batch_tokens, max_seq_len)
    tokens = (1, min(max_batch_tokens, requests * step), max_batch_tokens)
    context = (1, max(1, max_seq_len // 2), max_seq_len)
    # "batch": the slots a TensorRT-flavour target pass binds, [0, highest slot in the pass]
    return {"tokens": tokens, "rows": tokens, "requests": (1, requests, requests), "batch": (1, requests, requests),
            "query": (1, step, min(max_batch_tokens, max_seq_len)), "past": context, "context": context,
            # the verification tail: a pass that verifies nothing feeds zero rows and requests
            "verify_rows": (0, tokens[1], max_batch_tokens), "verify_requests": (0, requests, requests),
            "verify_offsets": (1, requests + 1, requests + 1),
            "drafts": (0, min(max_batch_tokens, requests * (step - 1)), max_batch_tokens)}


def tensorrt_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an exported graph for TensorRT's ONNX parser: each DSparkVerify node (ONNX Runtime's
    custom-op domain) becomes a node of the default domain that the parser's plugin fallback maps to
    `dspark::DSparkVerify` (plugin_namespace/plugin_version attributes), with has_draft_probs=1: the
    graph always feeds draft_probs (the one-hot q for greedy drafting, which gives the same result).
    TRT_KVCacheUpdate / TRT_Attention nodes take the layout onnx-tensorrt documents (trt_ops_ort.tensorrt_node).
    (domain `trt`, where NVIDIA's TensorRT-Edge-LLM exporter registers its TRT_* schemas); that the parser
    maps these nodes to its TRT_* importers is unverified here."""
    model = copy.deepcopy(model)
    trt_ops = False
    for node in model.graph.node:
        if node.op_type == VERIFY_OP:
            fields = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": "1", "has_draft_probs": 1}
            kept = [a for a in node.attribute if a.name not in fields]
            node.domain = ""
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in fields.items()])
        trt_ops = trt_ops_ort.tensorrt_node(node) or trt_ops
    domains = {o.domain for o in model.opset_import}
    if trt_ops and trt_ops_ort.TRT_DOMAIN not in domains:
        model.opset_import.append(trt_ops_ort.opset_import(trt_ops_ort.TRT_DOMAIN))
    return model


def profile_shapes(inputs: list[dict], bounds: dict[str, Shape]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """{input name: (min shape, opt shape, max shape)} for the inputs with dynamic dims (manifest I/O entries)."""
    profile = {}
    for entry in inputs:
        if all(isinstance(d, int) for d in entry["shape"]):
            continue
        missing = [d for d in entry["shape"] if isinstance(d, str) and d not in bounds]
        if missing:
            raise DSparkError(f"input '{entry['name']}': no profile bound for dynamic dim(s) {missing}")
        dims = [(d, d, d) if isinstance(d, int) else bounds[d] for d in entry["shape"]]
        profile[entry["name"]] = tuple(tuple(dim[i] for dim in dims) for i in range(3))
    return profile


def build_plans(out: str | Path, manifest: dict, max_batch_tokens: int, max_requests: int = MAX_REQUESTS,
                progress: Callable[[str], None] = lambda message: None) -> dict:
    """Compile every graph of the engine directory into `<name>.plan` and record them in its manifest."""
    import tensorrt as trt

    from dspark_trt_plugins.trt_plugin import register_plugin

    out = Path(out)
    dtype = manifest["dtype"]
    if dtype not in PRECISION_FLAGS:
        raise DSparkError(f"no TensorRT precision settings for dtype '{dtype}'")
    register_plugin()  # dspark::DSparkVerify, for graphs that end in the verification node
    block_size = manifest["draft"]["block_size"] if manifest["draft"] else 0
    bounds = dim_bounds(max_batch_tokens, manifest["max_seq_len"], max_requests, block_size)
    logger = trt.Logger(trt.Logger.WARNING)
    plans = {}
    for name, graph in manifest["graphs"].items():
        progress(f"[tensorrt] building {name}.plan")
        where = f"step 'tensorrt', graph '{name}'"
        profile = profile_shapes(graph["inputs"], bounds)
        try:
            plan = _build_plan(trt, logger, out / graph["file"], profile, PRECISION_FLAGS[dtype])
        except DSparkError as exc:
            raise DSparkError(f"{where}: {exc}") from exc
        except Exception as exc:  # TensorRT raises plain RuntimeErrors/TypeErrors
            raise DSparkError(f"{where}: {type(exc).__name__}: {exc}") from exc
        path = out / f"{name}.plan"
        path.write_bytes(plan)
        plans[name] = {"file": path.name, "sha256": sha256(path),
                       "profile": {k: [list(s) for s in v] for k, v in profile.items()}}
    manifest.update({"backend": "tensorrt", "plans": plans,
                     "tensorrt": {"version": trt.__version__, "max_requests": bounds["requests"][2],
                                  "max_batch_tokens": max_batch_tokens, "precision": PRECISION_FLAGS[dtype]}})
    manifest["versions"]["tensorrt"] = trt.__version__
    write_manifest(out, manifest)
    return manifest


def _build_plan(trt, logger, onnx_path: Path, profile: dict, precision: dict) -> bytes:
    """ONNX file -> serialized strongly typed plan with one optimization profile."""
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # the only mode in 11.x
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    model = tensorrt_graph(onnx.load(str(onnx_path)))
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DSparkError(f"the ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    for flag in precision.get("clear", []):
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            raise DSparkError(f"input '{tensor.name}' became a shape tensor; the runtime feeds data tensors only")
        if tensor.name in profile:
            opt_profile.set_shape(tensor.name, *profile[tensor.name])
        elif any(d < 0 for d in tensor.shape):
            raise DSparkError(f"input '{tensor.name}' has dynamic dims {tuple(tensor.shape)} the manifest does not name")
    config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DSparkError("TensorRT could not build the plan (its log above says why)")
    return bytes(plan)
