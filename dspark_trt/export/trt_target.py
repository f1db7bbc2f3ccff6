"""The target step for TensorRT 11: the fused graph's contract in standard ONNX plus TensorRT's own ops.

Same inputs, outputs and meanings as the fused ONNX Runtime graph (graphs/fused_target.py): the K/V
cache is one buffer per layer and kind, [slots, kv_heads, capacity, head_dim], bound as both
`past_key_<i>` and `present_key_<i>` and updated in place; a pass binds slots [0, B); the new tokens stay
packed [T] except in attention. Only the operators differ (manifest: target "graph": "trt"):

- Strongly typed (TensorRT 11 has no precision flags; precision = the ONNX tensor types): activations,
  norms and softmax float32, indices int32/int64.
- Weight-only quantization as blocked `DequantizeLinear` (opset 21+: block_size 32 along K, axis 0 of the
  MatMul weight [K, N], float32 scales, no zero point: TensorRT takes only zero zero-points) then
  `MatMul`, carrying the GGUF's own blocks re-centred to signed integers, exactly:
  Q4_0 w = d·(q − 8) is int4 q − 8; Q8_0 is int8; Q4_1 w = d·q + m is int4 q − 8 with minimum
  m' = m + 8·d, and minimums are applied as m'·blocksum(x) (Reshape/ReduceSum/MatMul/Add), as the
  fused graph does. Other block types and `weights="fp32"` are float32 MatMuls.
- `RMSNormalization` and `RotaryEmbedding` (opset 23, standard ONNX; TensorRT's IRotaryEmbeddingLayer).
- Per layer: `TRT_KVCacheUpdate` (packed_nhd update [T, kv, d] in slot order, write_indices = each
  slot's start, update_lengths = cumulative query lengths) appends the new K/V to the bound cache;
  `TRT_Attention` (padded_bhnd Q [B, heads, S, d] pre-scaled by 1/sqrt(d), K/V = the updated cache,
  causal_kind lower_right, query_lengths cumulative, kv_lengths = start + query length) attends each
  slot's rows over its cache (plugins/trt_ops_ort.py documents both and emulates them on ONNX Runtime).
  Slots of [0, B) outside the pass have zero query rows: nothing written, nothing read.
- The DSparkVerify node at the end (export/target_graph.add_verify_tail; plugins/trt_plugin.py).

The cache's capacity is static (TensorRT's IKVCacheUpdateLayer needs a static sequence dimension): the
graph is built for one `capacity` (the engine's max_seq_len) and the runtime's buffers have it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dspark_trt.errors import DSparkError
from dspark_trt.export.fused_target import GraphBuilder, fuse_rows, fused_weights, rotary_caches, step_graph_model
from dspark_trt.graphs.fused_target import cache_names
from dspark_trt.graphs.matmul_nbits import pack_nibbles
from dspark_trt.models.gguf_blocks import BLOCK, BlockWeight
from dspark_trt.models.target import TargetConfig
from dspark_trt_plugins import trt_ops_ort

OPSET = 23  # RMSNormalization, RotaryEmbedding; blocked DequantizeLinear (21+)
WEIGHTS = ("int4", "fp32")
# GGUF block format -> (ONNX element type of the signed codes, offset subtracted from the stored codes)
SIGNED = {"Q4_0": (TensorProto.INT4, 8), "Q4_1": (TensorProto.INT4, 8), "Q8_0": (TensorProto.INT8, 128)}


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two values per byte, the first in the low nibble (row-major order)."""
    flat = values.reshape(-1)
    return pack_nibbles(np.pad(flat, (0, flat.size % 2))).tobytes()


def signed_blocks(w: BlockWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes [N, K] int8 in the format's signed range, scales [N, K/32], minimums [N, K/32] or None) with
    w = scales·codes (+ minimums), the same weight as the GGUF's blocks."""
    _, offset = SIGNED[w.format]
    codes = (w.q.astype(np.int16) - offset).astype(np.int8)
    mins = None
    if w.mins is not None:  # d·q + m = d·(q − 8) + (m + 8·d)
        mins = (w.mins + np.float32(offset) * w.scales).astype(np.float32)
    return codes, w.scales.astype(np.float32), mins


class _DQLinear:
    """Emits y = x·Wᵀ for a weight given as float32 [N, K] or as GGUF blocks (blocked DequantizeLinear)."""

    def __init__(self, g: GraphBuilder):
        self.g = g
        self.bytes = 0
        self.formats: dict[str, int] = {}

    def _count(self, fmt: str, nbytes: int) -> None:
        self.formats[fmt] = self.formats.get(fmt, 0) + 1
        self.bytes += nbytes

    def __call__(self, x: str, weight, stem: str, output: str | None = None) -> str:
        g = self.g
        outputs = None if output is None else [output]
        if not isinstance(weight, BlockWeight) or weight.format not in SIGNED:
            w = weight.dequantize() if isinstance(weight, BlockWeight) else np.asarray(weight, np.float32)
            self._count("fp32", w.nbytes)
            return g.op("MatMul", [x, g.const(f"{stem}_wt", np.ascontiguousarray(w.T))], outputs=outputs)[0]
        n, k = weight.shape
        codes, scales, mins = signed_blocks(weight)
        elem, _ = SIGNED[weight.format]
        name = g.name(f"{stem}_q")
        codes_t = np.ascontiguousarray(codes.T)  # [K, N]: MatMul's B, blocks of 32 along axis 0
        if elem == TensorProto.INT4:
            g.initializers.append(helper.make_tensor(name, elem, [k, n], pack_int4(codes_t), raw=True))
            nbytes = (codes_t.size + 1) // 2
        else:
            g.initializers.append(numpy_helper.from_array(codes_t, name))
            nbytes = codes_t.nbytes
        w = g.op1("DequantizeLinear", [name, g.const(f"{stem}_scales", np.ascontiguousarray(scales.T))], axis=0,
                  block_size=BLOCK)
        nbytes += scales.nbytes
        if mins is None:
            y = g.op("MatMul", [x, w], outputs=outputs)[0]
        else:  # + m'·blocksum(x)
            blocks = g.op1("Reshape", [x, g.const("blocks_shape", np.array([-1, k // BLOCK, BLOCK]))])
            sums = g.op1("ReduceSum", [blocks, g.const("axis2", np.array([2]))], keepdims=0)
            correction = g.op1("MatMul", [sums, g.const(f"{stem}_mins", np.ascontiguousarray(mins.T))])
            y = g.op("Add", [g.op1("MatMul", [x, w]), correction], outputs=outputs)[0]
            nbytes += mins.nbytes
        self._count(weight.format, nbytes)
        return y


def _slot_order(g: GraphBuilder) -> dict[str, str]:
    """Index tensors shared by every layer, from the contract's inputs:
    lengths: [0, cumsum(query_lens)] int32 [B+1] (query_lengths and update_lengths);
    kv_lengths: seqlens_k + 1 int32 [B] (start + query length; 1 for an idle slot);
    write_indices: each slot's start int32 [B];
    slot_rows: int32 [T], the padded row (b·S + i) of the u-th new token in slot order, which is the order
    a packed_nhd update with cumulative lengths takes (the feeds' packed order is the caller's)."""
    q32 = "query_lens"
    cum = g.op1("CumSum", [q32, g.const("axis0", np.array(0, np.int32))])
    lengths = g.op1("Concat", [g.const("zero", np.zeros(1, np.int32)), cum], axis=0)
    kv_lengths = g.op1("Add", ["seqlens_k", g.const("one", np.array(1, np.int32))])
    write_indices = g.op1("Sub", [kv_lengths, q32])
    first = g.op1("Sub", [cum, q32])  # each slot's first row in slot order
    rows = g.op1("Cast", ["row_slots"], to=TensorProto.INT32)  # b·S + i of each packed token
    width = g.op1("Cast", [g.op1("Shape", ["gather_rows"], start=1, end=2)], to=TensorProto.INT32)  # [S]
    slot = g.op1("Div", [rows, width])
    order = g.op1("Add", [g.op1("Gather", [first, slot], axis=0), g.op1("Sub", [rows, g.op1("Mul", [slot, width])])])
    index = g.op1("Unsqueeze", [g.op1("Cast", [order], to=TensorProto.INT64), g.const("axes1", np.array([1]))])
    slot_rows = g.op1("ScatterND", [rows, index, rows])  # slot_rows[order[t]] = rows[t]
    return {"lengths": lengths, "kv_lengths": kv_lengths, "write_indices": write_indices, "slot_rows": slot_rows}


def build_trt_target(config: TargetConfig, weights: dict, capacity: int, tap_layers: Sequence[int] = ()
                     ) -> tuple[onnx.ModelProto, dict]:
    """(model, weight report) for parameters `weights` (name -> float32 [N, K] / [N] array or BlockWeight),
    with K/V caches of `capacity` positions."""
    if list(tap_layers) != sorted(set(tap_layers)):
        raise DSparkError(f"tap layers must be strictly increasing, got {list(tap_layers)}")
    if capacity < 2:
        raise DSparkError(f"the cache capacity must be at least 2 positions, got {capacity}")
    cfg = config
    g = GraphBuilder()
    linear = _DQLinear(g)
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps = float(cfg.rms_norm_eps)

    def dense(name):
        w = weights[name]
        return w.dequantize() if isinstance(w, BlockWeight) else np.asarray(w, dtype=np.float32)

    def norm(x, name):
        return g.op1("RMSNormalization", [x, g.const(name, dense(name))], axis=-1, epsilon=eps)

    # padded rows past a request's query read positions up to start + S - 1 < 2·capacity
    cos, sin = rotary_caches(cfg, 2 * capacity)
    cos_name, sin_name = g.const("cos_cache", cos), g.const("sin_cache", sin)
    index = _slot_order(g)
    scale = g.const("q_scale", np.array(d ** -0.5, np.float32))
    q_heads_shape = g.const("q_heads_shape", np.array([0, 0, heads, d]))
    kv_rows_shape = g.const("kv_rows_shape", np.array([-1, kv, d]))
    flat_shape = g.const("flat_shape", np.array([-1, heads * d]))
    x = g.op1("Gather", [g.const("embed_tokens", dense("embed_tokens.weight")), "input_ids"], axis=0)
    tapped = [x] if -1 in tap_layers else []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        a = norm(x, p + "input_layernorm.weight")
        qkv = linear(a, fuse_rows([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), f"{p}qkv")
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's q and k
            q, k, v = g.op("Split", [qkv, g.const("qkv_split", np.array([heads * d, kv * d, kv * d]))], 3, axis=-1)
            head_shape = g.const("head_shape", np.array([0, -1, d]))
            q, k = (g.op1("Reshape", [norm(g.op1("Reshape", [t, head_shape]), f"{p}self_attn.{n}_norm.weight"),
                                      g.const("rows_shape", np.array([0, -1]))])
                    for t, n in ((q, "q"), (k, "k")))
            qkv = g.op1("Concat", [q, k, v], axis=-1)
        padded = g.op1("Gather", [qkv, "gather_rows"], axis=0)  # [B, S, (H + 2 KV)·d]
        q, k, v = g.op("Split", [padded, g.const("qkv_split", np.array([heads * d, kv * d, kv * d]))], 3, axis=-1)
        q, k = (g.op1("RotaryEmbedding", [t, cos_name, sin_name, "positions_padded"], num_heads=n, interleaved=0)
                for t, n in ((q, heads), (k, kv)))
        q = g.op1("Mul", [g.op1("Transpose", [g.op1("Reshape", [q, q_heads_shape])], perm=[0, 2, 1, 3]), scale])
        past_k, past_v, present_k, present_v = cache_names(i)
        for past, present, new in ((past_k, present_k, k), (past_v, present_v, v)):
            update = g.op1("Gather", [g.op1("Reshape", [new, kv_rows_shape]), index["slot_rows"]], axis=0)
            g.nodes.append(trt_ops_ort.make_kv_update_node(
                [past, update, index["write_indices"], index["lengths"]], present, g.name("kv_update"),
                update_form="packed_nhd"))
        attn = g.name("attn")
        g.nodes.append(trt_ops_ort.make_attention_node(
            [q, present_k, present_v, index["lengths"], index["kv_lengths"]], attn, g.name("attention"),
            causal_kind="lower_right", TRT_decomposable=1))
        rows = g.op1("Gather", [g.op1("Reshape", [g.op1("Transpose", [attn], perm=[0, 2, 1, 3]), flat_shape]),
                                "row_slots"], axis=0)
        x = g.op1("Add", [x, linear(rows, weights[p + "self_attn.o_proj.weight"], f"{p}o")])
        m = norm(x, p + "post_attention_layernorm.weight")
        gate_up = linear(m, fuse_rows([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]),
                         f"{p}gate_up")
        gate, up = g.op("Split", [gate_up, g.const("split", np.array([cfg.intermediate_size] * 2))], 2, axis=-1)
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
        x = g.op1("Add", [x, linear(act, weights[p + "mlp.down_proj.weight"], f"{p}down")])
        if i in tap_layers:
            tapped.append(x)
    head = weights["embed_tokens.weight"] if cfg.tie_word_embeddings else \
        weights.get("lm_head.weight", weights["embed_tokens.weight"])
    linear(norm(g.op1("Gather", [x, "logits_rows"], axis=0), "norm.weight"), head, "lm_head", output="logits")
    model = step_graph_model(g, cfg, tapped, capacity, "dspark_target_trt", [trt_ops_ort.opset_import()])
    report = {"matmul_formats": dict(sorted(linear.formats.items())), "matmul_weight_bytes": int(linear.bytes),
              "capacity": capacity}
    return model, report


def dedupe_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """One opset import per domain (add_verify_tail appends the contrib domain the TRT ops already use)."""
    seen = {}
    for opset in model.opset_import:
        seen.setdefault(opset.domain, opset.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in seen.items())
    return model


def export_trt_target(target: str, model, path: str | Path, capacity: int, tap_layers: Sequence[int] = (),
                      weights: str = "int4", verify: bool = True) -> tuple[Path, dict]:
    """Write the TensorRT-flavour target graph (weights as external data next to it); returns (path, report).
    weights: "int4" (the GGUF `target`'s own blocks, blocked DequantizeLinear) or "fp32"."""
    from dspark_trt.export.target_graph import add_verify_tail

    if weights not in WEIGHTS:
        raise DSparkError(f"unknown weights '{weights}': choose from {', '.join(WEIGHTS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_model, report = build_trt_target(model.config, fused_weights(target, model, weights), capacity, tap_layers)
    if verify:
        dedupe_opsets(add_verify_tail(onnx_model, model.config.vocab_size))
    data = path.with_suffix(".onnx.data")
    data.unlink(missing_ok=True)
    onnx.save(onnx_model, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
    return path, report | {"weights": weights}
