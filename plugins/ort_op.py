"""DSparkVerify as an ONNX Runtime custom op (CPU), through onnxruntime-extensions' Python ops.

The op's compute is the torch reference `dspark_trt.spec.verify.dspark_verify`, so ONNX Runtime runs the
one semantics. onnxruntime-extensions places Python ops in its own domain, `ai.onnx.contrib` (fixed by
the library), so in ONNX the node is `ai.onnx.contrib::DSparkVerify`. Two deviations from SCHEMA.md, the
same ones the TensorRT plugin makes: `draft_probs` is always an input, with the int attribute
`has_draft_probs` (0 = greedy drafting, the tensor is ignored), and `uniforms` is float32 (the reference
compares and draws in float32 anyway, so the tokens are the same as from float64 uniforms). The node
also carries `plugin_namespace = "dspark"`, which TensorRT's ONNX parser reads to find the plugin.

A session runs a graph with the node only when its SessionOptions register the extensions library:
use `session_options_with_dspark_ops()`, or `inference_session()` which does so and names the fix
when a session was set up without it. Importing this module registers the op's Python compute (and
its ONNX schema, so `onnx.checker` and shape inference know the node). Inputs the reference rejects
give FAILED outputs (an exception would abort the process): pass the outputs to `check_outputs`.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from dspark_trt.errors import DSparkError
from dspark_trt.spec.verify import dspark_verify


def _import_extensions():
    """onnxruntime_extensions without its model converters. The package's __init__ imports `cvt`
    (gen_processing_models), which imports transformers: 1.8-3 s at the start of every process that runs a
    target graph, the Triton model stubs included, for an API this module does not use. While the package
    loads, `cvt` is a placeholder whose gen_processing_models imports the real one when called; the
    placeholder leaves sys.modules at once, so a later `import onnxruntime_extensions.cvt` is the real one."""
    import sys
    import types

    name = "onnxruntime_extensions.cvt"
    if "onnxruntime_extensions" in sys.modules or name in sys.modules:
        import onnxruntime_extensions

        return onnxruntime_extensions

    def gen_processing_models(*args, **kwargs):
        from onnxruntime_extensions.cvt import gen_processing_models as real

        return real(*args, **kwargs)

    placeholder = types.ModuleType(name)
    placeholder.gen_processing_models = gen_processing_models
    sys.modules[name] = placeholder
    try:
        import onnxruntime_extensions
    finally:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]
    return onnxruntime_extensions


try:
    _extensions = _import_extensions()
    PyCustomOpDef, get_library_path, onnx_op = _extensions.PyCustomOpDef, _extensions.get_library_path, \
        _extensions.onnx_op
except ImportError:  # the error is raised when a session needs the op
    onnx_op = None

DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for Python ops
OP_TYPE = "DSparkVerify"
DOMAIN_VERSION = 1
# (name, ONNX element type) in SCHEMA.md order
INPUTS = (
    ("target_logits", TensorProto.FLOAT), ("draft_tokens", TensorProto.INT64), ("draft_probs", TensorProto.FLOAT),
    ("row_offsets", TensorProto.INT64), ("temperature", TensorProto.FLOAT), ("top_k", TensorProto.INT64),
    ("top_p", TensorProto.FLOAT), ("uniforms", TensorProto.FLOAT),
)
OUTPUTS = (("accepted", TensorProto.INT64), ("next_token", TensorProto.INT64))
PLUGIN_NAMESPACE = "dspark"  # the TensorRT plugin's namespace (trt_plugin.py)
# declared node attributes: an undeclared one would abort the process in onnxruntime-extensions
ATTRIBUTES = {"has_draft_probs": onnx.defs.OpSchema.AttrType.INT,
              "plugin_namespace": onnx.defs.OpSchema.AttrType.STRING}
MISSING_EXTENSIONS = "onnxruntime-extensions is not installed: `pip install onnxruntime-extensions`"


def _fix(where: str) -> str:
    return (f"{where} uses the custom op {DOMAIN}::{OP_TYPE}, which this ONNX Runtime session does not know: "
            "create the session with dspark_trt_plugins.ort_op.session_options_with_dspark_ops() "
            "(it registers the onnxruntime-extensions library)")


FAILED = -1  # every output entry of a call the reference rejected; `check_outputs` raises the reason
# the last rejection's message, per thread: ORT runs a sequential graph's kernels on the thread that
# called run(), so concurrent sessions in other threads cannot overwrite it
_rejection = threading.local()


def verify_compute(target_logits, draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p, uniforms,
                   has_draft_probs: int = 1, plugin_namespace: str = PLUGIN_NAMESPACE):
    """The op's kernel: numpy in, numpy out, through the torch reference.

    An exception escaping a Python op aborts the whole process (onnxruntime-extensions 0.15), so a
    rejected call returns FAILED everywhere and keeps its message for `check_outputs`.
    """
    if len(temperature) == 0:  # a pass that verifies nothing (every plain decoding step)
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    t = torch.from_numpy
    q = t(np.ascontiguousarray(draft_probs)) if has_draft_probs else None
    try:
        result = dspark_verify(t(np.ascontiguousarray(target_logits)), t(draft_tokens), q, t(row_offsets),
                               t(temperature), t(top_k), t(top_p), t(uniforms))
    except Exception as exc:  # noqa: BLE001 - reported through check_outputs
        _rejection.message = f"{type(exc).__name__}: {exc}"
        failed = np.full(len(temperature), FAILED, dtype=np.int64)
        return failed, failed.copy()
    return result.accepted.numpy().astype(np.int64), result.next_token.numpy().astype(np.int64)


def check_outputs(accepted: np.ndarray, next_token: np.ndarray) -> None:
    """Raise the reason when the op rejected its inputs (outputs FAILED)."""
    if (np.asarray(accepted) == FAILED).any():
        raise DSparkError(f"{OP_TYPE} rejected its inputs: {getattr(_rejection, 'message', 'unknown reason')}")


if onnx_op is not None:
    _ORT_TYPES = {TensorProto.FLOAT: PyCustomOpDef.dt_float, TensorProto.INT64: PyCustomOpDef.dt_int64}
    _ORT_ATTRS = {"has_draft_probs": PyCustomOpDef.dt_int64, "plugin_namespace": PyCustomOpDef.dt_string}
    onnx_op(op_type=OP_TYPE, inputs=[_ORT_TYPES[t] for _, t in INPUTS],
            outputs=[_ORT_TYPES[t] for _, t in OUTPUTS], attrs=_ORT_ATTRS)(verify_compute)


def _infer_outputs(ctx) -> None:
    """accepted / next_token: int64 [R], R = the length of the per-request temperature."""
    requests = ctx.get_input_type(4).tensor_type.shape.dim
    for i in range(ctx.get_num_outputs()):
        out = helper.make_tensor_type_proto(TensorProto.INT64, None)
        if len(requests):
            out.tensor_type.shape.dim.add().CopyFrom(requests[0])
        ctx.set_output_type(i, out)


def register_onnx_schema() -> None:
    """Make the op known to onnx (checker, shape inference); idempotent."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    type_str = {TensorProto.FLOAT: "tensor(float)", TensorProto.INT64: "tensor(int64)"}
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION, "DSpark lossless verification; see plugins/SCHEMA.md",
        inputs=[param(name, type_str[t]) for name, t in INPUTS],
        outputs=[param(name, type_str[t]) for name, t in OUTPUTS],
        attributes=[onnx.defs.OpSchema.Attribute(name, kind, "see plugins/SCHEMA.md")
                    for name, kind in ATTRIBUTES.items()])
    schema.set_type_and_shape_inference_function(_infer_outputs)
    onnx.defs.register_schema(schema)


register_onnx_schema()


def opset_import() -> onnx.OperatorSetIdProto:
    return helper.make_opsetid(DOMAIN, DOMAIN_VERSION)


def make_verify_node(inputs: list[str], outputs: list[str], name: str = "dspark_verify",
                     has_draft_probs: bool = True) -> onnx.NodeProto:
    """The DSparkVerify node over the named tensors (SCHEMA.md order)."""
    if len(inputs) != len(INPUTS) or len(outputs) != len(OUTPUTS):
        raise DSparkError(f"{OP_TYPE} takes {len(INPUTS)} inputs and gives {len(OUTPUTS)} outputs, "
                          f"got {len(inputs)} and {len(outputs)}")
    return helper.make_node(OP_TYPE, inputs, outputs, name=name, domain=DOMAIN,
                            has_draft_probs=int(has_draft_probs), plugin_namespace=PLUGIN_NAMESPACE)


def session_options_with_dspark_ops(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """SessionOptions (new, or the given ones) with the library that runs DSparkVerify registered."""
    if onnx_op is None:
        raise DSparkError(MISSING_EXTENSIONS)
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


def inference_session(path: str | Path, options: ort.SessionOptions | None = None,
                      providers: list[str] | None = None) -> ort.InferenceSession:
    """ort.InferenceSession whose failure to find DSparkVerify becomes a DSparkError naming the fix."""
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        if OP_TYPE in str(exc) or DOMAIN in str(exc):
            raise DSparkError(_fix(f"graph {path}")) from exc
        raise
