"""TensorRT's ONNX custom ops `TRT_KVCacheUpdate` and `TRT_Attention`, emulated in ONNX Runtime.

The TensorRT flavour of the target graph (export/trt_target.py) appends K/V in place and attends over
the cache with the two custom ops that onnx-tensorrt maps to TensorRT 11's `IKVCacheUpdateLayer` and
`IAttention` (onnx/onnx-tensorrt `docs/TRT_custom_ops.md`). So that everything the TensorRT path
consumes runs somewhere here, this module gives both ops a numpy reference of their documented
semantics (for the forms the graph uses, and the simple ones beside them) and registers that reference
as onnxruntime-extensions Python ops, like ort_op.py does for DSparkVerify:

- `TRT_KVCacheUpdate(past_cache [B,H,N,D], update, write_indices int32 [B], update_lengths int32 [B+1])`:
  linear mode, axis -2. `update_form="padded_bhnd"`: update [B,H,S,D], all S rows of request b go to
  positions write_indices[b] .. +S. `"packed_nhd"`: update [T,H,D], request b's rows are
  update[update_lengths[b]:update_lengths[b+1]] (cumulative counts), written from write_indices[b]; a
  request with no rows writes nothing. Output: the updated cache. In TensorRT the output aliases the
  input (and must be a network output bound at the same address); a Python op cannot alias its input,
  so here it is a new array: the same values, validation only.
- `TRT_Attention(Q, K, V, [attn_mask], query_lengths int32 [B+1], kv_lengths int32 [B])`, padded_bhnd
  Q [B,Hq,S,D] and K/V [B,Hkv,N,D] (grouped-query: query head h reads K/V head h // (Hq/Hkv)), no
  implicit scale (the caller pre-scales Q), softmax normalisation. Request b has
  q = query_lengths[b+1] - query_lengths[b] query rows and kv = kv_lengths[b] keys; `causal_kind`
  "none": row i sees keys j < kv; "upper_left": j <= i; "lower_right": j <= kv - q + i (the diagonal
  anchored at the end of the valid keys: verification over a cache). Rows i >= q, and rows that see
  no key, are zeros here (TensorRT leaves them unspecified; the graph never reads them).

Layouts. The graph file is what ONNX Runtime runs: its nodes are `ai.onnx.contrib::TRT_*` (the Python
ops' domain) and TRT_Attention has no `attn_mask` slot, because a Python op cannot take an omitted
optional input: Q, K, V, query_lengths, kv_lengths. `tensorrt_node` turns such a node into the layout
TensorRT's parser reads (domain `trt`, as NVIDIA's TensorRT-Edge-LLM exports these ops, and an empty
`attn_mask` input at index 3); export/tensorrt_build.py applies it to the copy it parses. Schemas for
both layouts are registered with onnx, so the checker and shape inference accept either graph.

Errors: an exception escaping a Python op aborts the process (onnxruntime-extensions 0.15), so a
rejected call returns NaNs and keeps its reason; `raise_pending()` raises it (the runtimes call it
after every run).
"""
from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from dspark_trt.errors import DSparkError
from dspark_trt_plugins import ort_op

try:
    from onnxruntime_extensions import PyCustomOpDef, onnx_op
except ImportError:  # ort_op.session_options_with_dspark_ops names the missing package
    onnx_op = None

DOMAIN = ort_op.DOMAIN  # where ONNX Runtime's Python ops live: the graph file's nodes
TRT_DOMAIN = "trt"  # the parser copy's nodes (TensorRT-Edge-LLM's convention for TRT_* ops)
DOMAIN_VERSION = 1
KV_UPDATE = "TRT_KVCacheUpdate"
ATTENTION = "TRT_Attention"
FORMS = ("padded_bhnd", "packed_nhd")
CAUSAL_KINDS = ("none", "upper_left", "lower_right")
# every attribute the Python ops declare (onnxruntime-extensions aborts on an undeclared one), with the
# value written when the node does not set it: the documented defaults
KV_UPDATE_ATTRS = {"update_form": "padded_bhnd", "mode": "linear", "axis": -2}
ATTENTION_ATTRS = {"query_form": "padded_bhnd", "kv_form": "padded_bhnd", "causal_kind": "none",
                   "TRT_decomposable": 0, "TRT_normalization_op": "softmax", "nb_rank": 1}
# the emulation layout's inputs (TensorRT's TRT_Attention has attn_mask between V and query_lengths)
KV_UPDATE_INPUTS = ("past_cache", "update", "write_indices", "update_lengths")
ATTENTION_INPUTS = ("Q", "K", "V", "query_lengths", "kv_lengths")

_rejection = threading.local()


# ---- the reference semantics ----------------------------------------------------------------------
def kv_cache_update(past_cache: np.ndarray, update: np.ndarray, write_indices=None, update_lengths=None,
                    update_form: str = "padded_bhnd", mode: str = "linear", axis: int = -2) -> np.ndarray:
    """The cache with the update written in (a new array; TensorRT writes in place)."""
    if mode != "linear" or axis != -2:
        raise ValueError(f"only mode 'linear' on axis -2 is defined, got mode {mode!r}, axis {axis}")
    if update_form not in FORMS:
        raise ValueError(f"update_form must be one of {FORMS}, got {update_form!r}")
    cache = np.array(past_cache, copy=True)
    if cache.ndim != 4:
        raise ValueError(f"past_cache must be [B, H, N, D], got shape {cache.shape}")
    b, h, n, d = cache.shape
    starts = np.zeros(b, np.int64) if write_indices is None else np.asarray(write_indices, np.int64)
    if starts.shape != (b,):
        raise ValueError(f"write_indices must be [{b}], got shape {starts.shape}")
    if update_form == "padded_bhnd":
        if update_lengths is not None:
            raise ValueError("update_lengths is read with update_form 'packed_nhd' only")
        if update.ndim != 4 or update.shape[:2] != (b, h) or update.shape[3] != d:
            raise ValueError(f"a padded update must be [{b}, {h}, S, {d}], got shape {update.shape}")
        lengths = np.full(b, update.shape[2], np.int64)
        rows = [update[i] for i in range(b)]
    else:
        if update_lengths is None:
            raise ValueError("a packed update needs update_lengths [B + 1]")
        offsets = np.asarray(update_lengths, np.int64)
        if update.ndim != 3 or update.shape[1:] != (h, d):
            raise ValueError(f"a packed update must be [T, {h}, {d}], got shape {update.shape}")
        if offsets.shape != (b + 1,) or offsets[0] != 0 or (np.diff(offsets) < 0).any() \
                or offsets[-1] != update.shape[0]:
            raise ValueError(f"update_lengths must be [{b + 1}] cumulative counts from 0 to {update.shape[0]}, "
                             f"got {offsets.tolist()}")
        lengths = np.diff(offsets)
        rows = [update[offsets[i]:offsets[i + 1]].transpose(1, 0, 2) for i in range(b)]
    if (starts < 0).any() or (starts + lengths > n).any():
        raise ValueError(f"writes {starts.tolist()} + {lengths.tolist()} rows fall outside the cache's {n} positions")
    for i in range(b):
        cache[i, :, starts[i]:starts[i] + lengths[i]] = rows[i]
    return cache


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, query_lengths=None, kv_lengths=None,
              query_form: str = "padded_bhnd", kv_form: str = "padded_bhnd", causal_kind: str = "none",
              normalization: str = "softmax") -> np.ndarray:
    """softmax(Q·Kᵀ masked)·V per request, padded_bhnd Q and K/V (module docstring)."""
    if query_form != "padded_bhnd" or kv_form != "padded_bhnd":
        raise ValueError(f"only padded_bhnd Q and K/V are emulated, got {query_form!r} / {kv_form!r}")
    if causal_kind not in CAUSAL_KINDS:
        raise ValueError(f"causal_kind must be one of {CAUSAL_KINDS}, got {causal_kind!r}")
    if normalization != "softmax":
        raise ValueError(f"only softmax normalization is emulated, got {normalization!r}")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"Q [B,Hq,S,D] and K/V [B,Hkv,N,D] expected, got {q.shape}, {k.shape}, {v.shape}")
    b, hq, s, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    if query_lengths is None:
        q_lens = np.full(b, s, np.int64)
    else:
        offsets = np.asarray(query_lengths, np.int64)
        if offsets.shape != (b + 1,) or offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise ValueError(f"query_lengths must be [{b + 1}] cumulative counts from 0, got {offsets.tolist()}")
        q_lens = np.diff(offsets)
    kv_lens = np.full(b, n, np.int64) if kv_lengths is None else np.asarray(kv_lengths, np.int64)
    if kv_lens.shape != (b,) or (q_lens > s).any() or (kv_lens < 0).any() or (kv_lens > n).any():
        raise ValueError(f"query lengths {q_lens.tolist()} (at most {s}) and kv lengths {kv_lens.tolist()} "
                         f"(at most {n}) do not fit the tensors")
    i = np.arange(s)[None, :, None]
    j = np.arange(n)[None, None, :]
    allowed = (j < kv_lens[:, None, None]) & (i < q_lens[:, None, None])  # [B, S, N]
    if causal_kind == "upper_left":
        allowed &= j <= i
    elif causal_kind == "lower_right":
        allowed &= j <= (kv_lens - q_lens)[:, None, None] + i
    group = hq // hkv
    keys = np.repeat(k, group, axis=1).astype(np.float64)
    values = np.repeat(v, group, axis=1).astype(np.float64)
    scores = q.astype(np.float64) @ keys.transpose(0, 1, 3, 2)  # [B, Hq, S, N]
    scores = np.where(allowed[:, None], scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    weights = np.where(allowed[:, None], np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = weights.sum(-1, keepdims=True)
    out = (weights / np.where(total > 0, total, 1.0)) @ values
    return out.astype(q.dtype)


# ---- the ONNX Runtime ops -------------------------------------------------------------------------
def _guarded(compute, like: int):
    """Run compute; on a rejected call keep the reason and return NaNs shaped like input `like`."""
    def run(*args, **attrs):
        try:
            return compute(*args, **attrs)
        except Exception as exc:  # noqa: BLE001 - reported through raise_pending
            _rejection.message = f"{compute.__name__}: {type(exc).__name__}: {exc}"
            return np.full(np.shape(args[like]), np.nan, dtype=np.float32)
    return run


def _kv_update_op(past_cache, update, write_indices, update_lengths, update_form="padded_bhnd", mode="linear",
                  axis=-2):
    return kv_cache_update(past_cache, update, write_indices, update_lengths, update_form, mode, int(axis))


def _attention_op(q, k, v, query_lengths, kv_lengths, query_form="padded_bhnd", kv_form="padded_bhnd",
                  causal_kind="none", TRT_decomposable=0, TRT_normalization_op="softmax", nb_rank=1):  # noqa: N803
    return attention(q, k, v, query_lengths, kv_lengths, query_form, kv_form, causal_kind, TRT_normalization_op)


def raise_pending() -> None:
    """Raise the reason of the last call an emulated op rejected in this thread (once)."""
    message = getattr(_rejection, "message", None)
    if message is not None:
        _rejection.message = None
        raise DSparkError(f"an emulated TensorRT op rejected its inputs: {message}")


if onnx_op is not None:
    _F, _I32 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32

    def _attr_types(defaults: dict) -> dict:
        return {k: PyCustomOpDef.dt_string if isinstance(v, str) else PyCustomOpDef.dt_int64
                for k, v in defaults.items()}

    onnx_op(op_type=KV_UPDATE, inputs=[_F, _F, _I32, _I32], outputs=[_F],
            attrs=_attr_types(KV_UPDATE_ATTRS))(_guarded(_kv_update_op, 0))
    onnx_op(op_type=ATTENTION, inputs=[_F, _F, _F, _I32, _I32], outputs=[_F],
            attrs=_attr_types(ATTENTION_ATTRS))(_guarded(_attention_op, 0))


def session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """SessionOptions that run a TensorRT-flavour graph as TensorRT computes it: the extensions library
    (these ops and DSparkVerify) and int4/int8 DequantizeLinear + MatMul in float32. ONNX Runtime fuses
    that pair into MatMulNBits with int8 activations (accuracy level 4) by default, which TensorRT's
    weight-only quantization does not do; level 1 keeps float32 activations."""
    options = ort_op.session_options_with_dspark_ops(options)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


# ---- nodes, schemas, the parser's layout ------------------------------------------------------------
def _with_defaults(defaults: dict, attrs: dict) -> dict:
    unknown = set(attrs) - set(defaults)
    if unknown:
        raise DSparkError(f"unknown attributes {sorted(unknown)}; known: {sorted(defaults)}")
    return defaults | attrs


def make_kv_update_node(inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    """`ai.onnx.contrib::TRT_KVCacheUpdate` over (past_cache, update, write_indices, update_lengths)."""
    if len(inputs) != len(KV_UPDATE_INPUTS):
        raise DSparkError(f"{KV_UPDATE} takes {KV_UPDATE_INPUTS}, got {inputs}")
    return helper.make_node(KV_UPDATE, inputs, [output], name=name, domain=DOMAIN,
                            **_with_defaults(KV_UPDATE_ATTRS, attrs))


def make_attention_node(inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    """`ai.onnx.contrib::TRT_Attention` over (Q, K, V, query_lengths, kv_lengths)."""
    if len(inputs) != len(ATTENTION_INPUTS):
        raise DSparkError(f"{ATTENTION} takes {ATTENTION_INPUTS} here (no attn_mask), got {inputs}")
    return helper.make_node(ATTENTION, inputs, [output], name=name, domain=DOMAIN,
                            **_with_defaults(ATTENTION_ATTRS, attrs))


def tensorrt_node(node: onnx.NodeProto) -> bool:
    """Rewrite an emulation-layout TRT_* node (in place) into the layout TensorRT's parser reads; False
    for any other node."""
    if node.domain != DOMAIN or node.op_type not in (KV_UPDATE, ATTENTION):
        return False
    node.domain = TRT_DOMAIN
    if node.op_type == ATTENTION:
        inputs = list(node.input)
        del node.input[:]
        node.input.extend(inputs[:3] + [""] + inputs[3:])  # attn_mask: none (the causal kind masks)
    return True


def opset_import(domain: str = DOMAIN) -> onnx.OperatorSetIdProto:
    return helper.make_opsetid(domain, DOMAIN_VERSION)


def _like_input(index: int):
    def infer(ctx) -> None:
        ctx.set_output_type(0, ctx.get_input_type(index))
    return infer


def register_onnx_schemas() -> None:
    """Both ops in both layouts known to onnx (checker, shape inference); idempotent."""
    param, schema_t = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    floats, ints = "tensor(float)", "tensor(int32)"
    attr_kind = {str: schema_t.AttrType.STRING, int: schema_t.AttrType.INT}
    layouts = {
        (KV_UPDATE, DOMAIN): [param(n, t) for n, t in zip(KV_UPDATE_INPUTS, (floats, floats, ints, ints))],
        (KV_UPDATE, TRT_DOMAIN): [param("past_cache", floats), param("update", floats),
                                  param("write_indices", ints, param_option=optional),
                                  param("update_lengths", ints, param_option=optional)],
        (ATTENTION, DOMAIN): [param(n, t) for n, t in zip(ATTENTION_INPUTS, (floats,) * 3 + (ints,) * 2)],
        (ATTENTION, TRT_DOMAIN): [param("Q", floats), param("K", floats), param("V", floats),
                                  param("attn_mask", "tensor(bool)", param_option=optional),
                                  param("query_lengths", ints, param_option=optional),
                                  param("kv_lengths", ints, param_option=optional)],
    }
    for (op, domain), inputs in layouts.items():
        if onnx.defs.has(op, domain):
            continue
        defaults = KV_UPDATE_ATTRS if op == KV_UPDATE else ATTENTION_ATTRS
        schema = schema_t(op, domain, DOMAIN_VERSION, f"TensorRT's {op} (onnx-tensorrt docs/TRT_custom_ops.md)",
                          inputs=inputs, outputs=[param("Y", floats)],
                          attributes=[schema_t.Attribute(k, attr_kind[type(v)], "see TRT_custom_ops.md")
                                      for k, v in defaults.items()])
        schema.set_type_and_shape_inference_function(_like_input(0))
        onnx.defs.register_schema(schema)


register_onnx_schemas()

__all__ = ["ATTENTION", "DOMAIN", "KV_UPDATE", "TRT_DOMAIN", "attention", "kv_cache_update", "make_attention_node",
           "make_kv_update_node", "raise_pending", "session_options", "tensorrt_node"]
