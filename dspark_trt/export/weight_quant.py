"""Weight-only quantization of an exported graph's MatMuls as ONNX Runtime's `com.microsoft::MatMulNBits`.

Symmetric blocks of `BLOCK_SIZE` along K, one float32 scale per block and no zero-point input (the
operator's default zero point, 2^(bits-1), is the symmetric one): w ≈ scale * (q - 2^(bits-1)). Float
zero points would take ONNX Runtime's slow fallback, and accuracy level 4 (int8 activations, VNNI kernels)
is the fast path on CPU; with 8-bit weights accuracy level 1 (float32 compute) is ~30x slower.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

WEIGHT_FORMATS = ("fp32", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: ONNX Runtime's fast MatMulNBits kernels on CPU
MIN_ELEMENTS = 1 << 16  # smaller weights stay float32 (they cost nothing measurable)
MS_DOMAIN = "com.microsoft"


def quantize_weight(w: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B [N, K/block, block*bits/8] uint8 and scales [N, K/block] float32 of a weight w [K, N]."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block_size, block_size).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=-1) / qmax
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    q = q.astype(np.uint8)
    if bits == 4:  # two per byte, the first in the low nibble
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), scales.astype(np.float32)


def dequantize_weight(q: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float32 weight [K, N] that MatMulNBits computes with (tests and error reports)."""
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


def quantize_matmuls(model: onnx.ModelProto, weights: str, block_size: int = BLOCK_SIZE,
                     accuracy_level: int = ACCURACY_LEVEL, min_elements: int = MIN_ELEMENTS) -> list[str]:
    """Turn every MatMul(A, W) whose W is a top-level float32 initializer [K, N] (K a multiple of block_size,
    at least min_elements) into MatMulNBits, in the main graph and its subgraphs; in place. Returns the
    names of the weights replaced."""
    bits = BITS[weights]
    inline_initializer_identities(model)
    top = model.graph
    inits = {i.name: i for i in top.initializer}
    done: dict[str, tuple[str, str, int, int]] = {}
    for graph in all_graphs(top):
        for node in graph.node:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
                continue
            name = node.input[1]
            if name not in done:
                init = inits[name]
                if (init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or init.dims[0] % block_size
                        or init.dims[0] * init.dims[1] < min_elements):
                    continue
                k, n = init.dims
                q, scales = quantize_weight(numpy_helper.to_array(init), bits, block_size)
                top.initializer.extend([numpy_helper.from_array(q, f"{name}_q{bits}"),
                                        numpy_helper.from_array(scales, f"{name}_scales")])
                done[name] = (f"{name}_q{bits}", f"{name}_scales", k, n)
            q_name, s_name, k, n = done[name]
            replacement = helper.make_node("MatMulNBits", [node.input[0], q_name, s_name], list(node.output),
                                           name=f"{node.name}_nbits", domain=MS_DOMAIN, K=k, N=n, bits=bits,
                                           block_size=block_size, accuracy_level=accuracy_level)
            node.CopyFrom(replacement)
    used = {name for graph in all_graphs(top) for node in graph.node for name in node.input}
    kept = [i for i in top.initializer if i.name in used or i.name not in done]
    del top.initializer[:]
    top.initializer.extend(kept)
    if done and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return sorted(done)
