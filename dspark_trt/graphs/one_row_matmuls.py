"""Does this CPU compute a one-row MatMulNBits like the same row inside a longer one?

ONNX Runtime picks MatMulNBits' kernel by CPU features and the number of rows M. On some CPUs (AVX2 without
AVX-512, measured) its M = 1 kernel sums in another order than the M >= 2 one (6e-7 on a [1, 576] x [576, 960]
product, about 1 in a logit after 30 int8-activation layers), so a token decoded alone would not get the logits
it gets beside drafts or other requests. Where that happens the fused target runtime never lets such a matmul see
one row (graphs/fused_target.py, `fused_feeds`'s `min_rows` for the layers, `min_logits_rows` for the LM head);
where the kernels agree it does not need to. `one_row_padding` answers for the layers and the head apart: on
AVX2 the 4-bit kernels differ and the GGUF's 8-bit head's agree, and there a second head row cost 2.8x.

`one_row_matmuls_match` answers for a graph's own MatMulNBits configurations (K, N, bits, zero points,
accuracy level) with random weights: the kernel is chosen by those and the CPU, not by the weights' values.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dspark_trt.graphs.matmul_nbits import pack_nibbles, pack_zero_points

MS = "com.microsoft"
PROBE_ROWS = (1, 2, 3, 8)  # M = 1 against the kernels of a few longer passes


def matmul_configs(model_path: str | Path) -> tuple[tuple[int, int, int, bool, int], ...]:
    """(K, N, bits, has zero points, accuracy level) of each distinct MatMulNBits in a graph file, and
    (K, N, 32, False, 0) of each float32 `Gemm` with a transposed initializer B (the float32 LM head); the
    weights, in external data, are not read."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    dims = {init.name: tuple(init.dims) for init in graph.initializer}
    configs = set()
    for node in graph.node:
        if node.op_type == "Gemm" and node.input[1] in dims:
            n, k = dims[node.input[1]]
            configs.add((k, n, 32, False, 0))
        if node.op_type == "MatMulNBits" and node.domain == MS:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            configs.add((attrs["K"], attrs["N"], attrs.get("bits", 4), len(node.input) > 3 and bool(node.input[3]),
                         attrs.get("accuracy_level", 0)))
    return tuple(sorted(configs))


def one_row_padding(model_path: str | Path, vocab_size: int, threads: int | None = None) -> tuple[bool, bool]:
    """(the layers' matmuls need a second row, the LM head does) for a target graph file on this CPU; the head
    is the MatMulNBits or float32 Gemm whose N is the vocabulary."""
    configs = matmul_configs(model_path)
    head = tuple(c for c in configs if c[1] == vocab_size)
    layers = tuple(c for c in configs if c[1] != vocab_size)
    return not one_row_matmuls_match(layers, threads), not one_row_matmuls_match(head, threads)


@functools.lru_cache(maxsize=None)
def one_row_matmuls_match(configs: tuple[tuple[int, int, int, bool, int], ...], threads: int | None = None) -> bool:
    """True when, for every configuration, a row computed alone equals it computed among PROBE_ROWS rows,
    bit for bit, on this CPU with `threads` intra-op threads."""
    import onnxruntime as ort

    if not configs:
        return True
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    rng = np.random.default_rng(0)
    for k, n, bits, zero_points, accuracy_level in configs:
        session = ort.InferenceSession(_probe_model(k, n, bits, zero_points, accuracy_level, rng).SerializeToString(),
                                       options, providers=["CPUExecutionProvider"])
        x = rng.standard_normal((max(PROBE_ROWS), k)).astype(np.float32)
        alone = session.run(None, {"x": x[:1]})[0]
        if any(not np.array_equal(session.run(None, {"x": x[:m]})[0][:1], alone) for m in PROBE_ROWS[1:]):
            return False
    return True


def _probe_model(k: int, n: int, bits: int, zero_points: bool, accuracy_level: int, rng) -> onnx.ModelProto:
    if bits == 32:
        return _model(helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), k, n,
                      [numpy_helper.from_array((rng.standard_normal((n, k)) * 0.02).astype(np.float32), "w")])
    blocks, block = k // 32, 32
    q = rng.integers(0, 1 << bits, (n, blocks, block), dtype=np.uint8)
    packed = pack_nibbles(q) if bits == 4 else q
    inits = [numpy_helper.from_array(packed, "q"),
             numpy_helper.from_array((rng.random(n * blocks) * 0.02).astype(np.float32), "scales")]
    inputs = ["x", "q", "scales"]
    if zero_points:
        zp = rng.integers(0, 1 << bits, (n, blocks), dtype=np.uint8)
        inits.append(numpy_helper.from_array(pack_zero_points(zp, bits), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain=MS, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=accuracy_level)
    return _model(node, k, n, inits)


def _model(node: onnx.NodeProto, k: int, n: int, inits: list) -> onnx.ModelProto:
    """A one-node graph y [M, n] = node(x [M, k])."""
    graph = helper.make_graph([node], "one_row_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
