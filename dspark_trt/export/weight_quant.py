"""Quantized weights for an exported graph's MatMuls, on ONNX Runtime's integer kernels.

- "int8": weights int8 in -63..63 (7 bits), one scale per output column; the activations are quantized
  in the graph, one scale per row (uint8, zero point 128), and `com.microsoft::MatMulIntegerToFloat`
  accumulates in int32 before the scales are applied. A row's result does not depend on the other rows
  of the pass (integer sums are exact; no scale is shared across rows), so drafts are batch-invariant.
  7 bits because CPUs without VNNI (AVX2) multiply uint8 by int8 in pairs summed into int16, which
  saturates beyond 255 · 63 · 2: with full-range weights the int32 sums were off by up to 1e5 on such a
  CPU (ONNX Runtime's quantizer calls the same remedy `reduce_range`).
- "int4": `com.microsoft::MatMulNBits`, symmetric blocks of `BLOCK_SIZE` along K with one float32 scale
  each and no zero-point input (the operator's default, 8, is the symmetric one), accuracy level 4 (int8
  activations per block). Float zero points would take ONNX Runtime's slow fallback.

Measured on these 2-core machines (the drafter's LM head, 576 x 49,152, M = 7 per request): MatMulNBits
with 8-bit weights is no faster than float32 from M = 28 on, while the int8 GEMM is about 3x faster than
float32 at every M; MatMulNBits 4-bit is fastest at M = 1 only. A weight with fewer than MIN_DEPTH rows (K)
stays float32 in both schemes: there the activation's quantization costs more than the integer GEMM saves (the
Markov head's rank-64 W2, 64 x 8,192, once per block position: float32 17 us, int8 64 us at M = 1 on the AMX
Xeon; 56 against 128 us on the AVX2 VM).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dspark_trt.graphs.matmul_nbits import pack_nibbles

WEIGHT_FORMATS = ("fp32", "int8", "int4")
BLOCK_SIZE = 32  # int4: weights per scale along K
ACCURACY_LEVEL = 4  # int4: int8 activations, ONNX Runtime's fast MatMulNBits kernels on CPU
WEIGHT_QMAX = 63  # int8: 7-bit weights, exact on CPUs without VNNI too (see above)
MIN_ELEMENTS = 1 << 16  # smaller weights stay float32 (they cost nothing measurable)
MIN_DEPTH = 128  # weights with fewer rows (K) stay float32: quantizing the activation costs more than it saves
MS_DOMAIN = "com.microsoft"
CONSTANTS = {"wq/one": np.array(1.0, np.float32), "wq/zero_point": np.array(128, np.uint8),
             "wq/qmax": np.array(127.0, np.float32), "wq/tiny": np.array(1e-30, np.float32)}


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weight [K, N] (symmetric, -WEIGHT_QMAX..WEIGHT_QMAX) and its scales [N]: w ≈ q * scale."""
    scales = np.abs(w).max(axis=0) / WEIGHT_QMAX
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(w / scales), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    return q, scales.astype(np.float32)


def quantize_blocks(w: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B [N, K/block, block*bits/8] uint8 and scales [N, K/block] float32 of a weight w [K, N]
    (symmetric: the operator's default zero point 2^(bits-1))."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block_size, block_size).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=-1) / qmax
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    q = pack_nibbles(q) if bits == 4 else q.astype(np.uint8)
    return np.ascontiguousarray(q), scales.astype(np.float32)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float32 weight [K, N] that MatMulNBits computes with (tests)."""
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:2], -1)
    w = (q.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    return w.reshape(w.shape[0], k).T


def all_graphs(graph: onnx.GraphProto):
    """A graph and, depth first, every subgraph of its nodes (If branches, Loop bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            for sub in attr.graphs:
                yield from all_graphs(sub)


def inline_initializer_identities(model: onnx.ModelProto) -> None:
    """Read top-level initializers directly where the exporter put an Identity in between (it does so for a
    weight used more than once); in place, subgraphs included. Such a MatMul then has its weight as an
    initializer, which the quantizer (and ONNX Runtime's weight prepacking) needs."""
    top = model.graph
    inits = {i.name for i in top.initializer}
    outputs = {o.name for graph in all_graphs(top) for o in graph.output}
    alias: dict[str, str] = {}
    for graph in all_graphs(top):
        for node in graph.node:
            source = alias.get(node.input[0], node.input[0]) if node.input else None
            if node.op_type == "Identity" and source in inits and node.output[0] not in outputs:
                alias[node.output[0]] = source
    for graph in all_graphs(top):
        kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
        for node in kept:
            for i, name in enumerate(node.input):
                node.input[i] = alias.get(name, name)
        del graph.node[:]
        graph.node.extend(kept)


def quantize_matmuls(model: onnx.ModelProto, weights: str, min_elements: int = MIN_ELEMENTS,
                     min_depth: int = MIN_DEPTH) -> list[str]:
    """Turn every MatMul(A, W) whose W is a top-level float32 initializer [K, N] with at least min_elements
    and K >= min_depth (int4: K a multiple of BLOCK_SIZE) into the `weights` scheme, in the main graph and its
    subgraphs; in place. Returns the names of the weights replaced."""
    inline_initializer_identities(model)
    top = model.graph
    inits = {i.name: i for i in top.initializer}
    done: dict[str, tuple[str, str, int, int]] = {}
    for graph in all_graphs(top):
        rows: dict[str, tuple[str, str]] = {}  # int8: each activation's quantized rows and their scales
        nodes = []
        for node in graph.node:
            init = inits.get(node.input[1]) if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
            if init is None or not _quantizable(init, weights, min_elements, min_depth):
                nodes.append(node)
                continue
            name = init.name
            if name not in done:
                w = numpy_helper.to_array(init)
                q, scales = quantize_columns(w) if weights == "int8" else quantize_blocks(w, 4)
                top.initializer.extend([numpy_helper.from_array(q, f"{name}_{weights}"),
                                        numpy_helper.from_array(scales, f"{name}_scales")])
                done[name] = (f"{name}_{weights}", f"{name}_scales", *init.dims)
            q_name, s_name, k, n = done[name]
            if weights == "int4":
                nodes.append(helper.make_node("MatMulNBits", [node.input[0], q_name, s_name], list(node.output),
                                              name=f"{node.name}_nbits", domain=MS_DOMAIN, K=k, N=n, bits=4,
                                              block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL))
                continue
            a = node.input[0]
            if a not in rows:
                nodes.extend(_quantize_rows(a, f"{a}/rows"))
                rows[a] = (f"{a}/rows/q", f"{a}/rows/scale")
            a_q, a_scale = rows[a]
            nodes.append(helper.make_node("MatMulIntegerToFloat", [a_q, q_name, "wq/one", s_name, "wq/zero_point"],
                                          [f"{node.output[0]}/unscaled"], name=f"{node.name}_int8", domain=MS_DOMAIN))
            nodes.append(helper.make_node("Mul", [f"{node.output[0]}/unscaled", a_scale], list(node.output),
                                          name=f"{node.name}_row_scale"))
        del graph.node[:]
        graph.node.extend(nodes)
    used = {name for graph in all_graphs(top) for node in graph.node for name in node.input}
    kept = [i for i in top.initializer if i.name in used or i.name not in done]
    del top.initializer[:]
    top.initializer.extend(kept)
    if done and weights == "int8":
        top.initializer.extend(numpy_helper.from_array(v, k) for k, v in CONSTANTS.items())
    if done and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return sorted(done)


def _quantizable(init: onnx.TensorProto, weights: str, min_elements: int, min_depth: int) -> bool:
    return (init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2 and init.dims[0] >= min_depth
            and init.dims[0] * init.dims[1] >= min_elements and (weights == "int8" or init.dims[0] % BLOCK_SIZE == 0))


def _quantize_rows(a: str, p: str) -> list[onnx.NodeProto]:
    """Nodes quantizing activation `a` [..., K] per row: scale = max|row| / 127, q = round(a / scale) + 128."""
    return [helper.make_node("Abs", [a], [f"{p}/abs"], name=f"{p}/abs"),
            helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/absmax"], name=f"{p}/absmax", axes=[-1], keepdims=1),
            helper.make_node("Max", [f"{p}/absmax", "wq/tiny"], [f"{p}/range"], name=f"{p}/range"),
            helper.make_node("Div", [f"{p}/range", "wq/qmax"], [f"{p}/scale"], name=f"{p}/scale"),
            helper.make_node("Div", [a, f"{p}/scale"], [f"{p}/scaled"], name=f"{p}/scaled"),
            helper.make_node("QuantizeLinear", [f"{p}/scaled", "wq/one", "wq/zero_point"], [f"{p}/q"], name=f"{p}/q")]
