"""The target step for ONNX Runtime, built from its fused LLM operators (the default CPU engine).

Same computation as the torch reference (TargetModel) and the portable graph (target_graph.py), on
ONNX Runtime's own LLM kernels: `GroupQueryAttention` with the K/V cache updated in place (the
runtime binds one buffer per layer as both past and present, graphs/fused_target.py), rotary
embedding inside it, `SkipSimplifiedLayerNormalization` for residual + RMSNorm, and `MatMulNBits`
for the projections and the LM head, carrying the GGUF's own blocks:

- Q4_0 / Q8_0 blocks are MatMulNBits weights as they are (w = d·(q − z), integer z).
- Q4_1 blocks (w = d·q + m) are MatMulNBits with zero point 0 plus the blocks' minimums times the
  activations' block sums: W·x = (d·q)·x + m·blocksum(x), which is what llama.cpp's q4_1 dot does
  MatMulNBits also takes float zero points, z = −m/d, but ONNX Runtime 1.32 has no fast kernel for
  them: 80 ms instead of 0.8 ms for the LM head, measured here. Moving each minimum to the nearest
  multiple of d (an integer zero point, no block sums) saves about 2 ms a step but is far off: mean KL
  0.84 against the float32 reference on the build's validation passes, where the exact blocks give 0.04.
- other block types, and `weights="fp32"`, become float32 MatMuls of the dequantized weights.

Activations stay packed [T, hidden] for the matmuls; only attention sees the padded layout
[B, S] of the bound cache rows (B slots, S = longest query), gathered and scattered by index.
`accuracy_level` 4 (int8 activations, as llama.cpp's dot products) is batch-invariant on this
ONNX Runtime: a row's output does not depend on how many rows share the pass (tested).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.fused_target import INPUTS, cache_names
from dspark_trt.graphs.matmul_nbits import pack_nibbles, pack_zero_points
from dspark_trt.models.gguf_blocks import BLOCK, BlockWeight
from dspark_trt.models.target import TargetConfig

OPSET = 23  # RMSNormalization (the first layer's norm, which has no residual to add yet)
WEIGHTS = ("int4", "fp32")
LM_HEADS = ("gguf", "fp32")  # the LM head as the GGUF stores it (Q8_0 for SmolLM2), or float32
DEFAULT_ACCURACY_LEVEL = 4
MS = "com.microsoft"


def fused_supported(config: TargetConfig) -> bool:
    """ONNX Runtime's CPU GroupQueryAttention takes head sizes that are multiples of 16."""
    return config.head_dim % 16 == 0


class GraphBuilder:
    """Nodes, initializers and unique names for one graph under construction."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, array: np.ndarray) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", outputs=None,
           **attrs) -> list[str]:
        outputs = list(outputs) if outputs is not None else [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self.name(op_type), domain=domain,
                                           **attrs))
        return outputs

    def op1(self, op_type: str, inputs: Sequence[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


class _Linear:
    """Emits y = x·Wᵀ for a weight given as float32 [N, K] or as GGUF blocks."""

    def __init__(self, g: GraphBuilder, accuracy_level: int):
        self.g = g
        self.accuracy_level = accuracy_level
        self.bytes = 0
        self.formats: dict[str, int] = {}

    def __call__(self, x: str, weight, stem: str) -> str:
        g = self.g
        if isinstance(weight, BlockWeight):
            return self._nbits(x, weight, stem)
        w = np.asarray(weight, dtype=np.float32)
        self._count("fp32", w.nbytes)
        return g.op1("MatMul", [x, g.const(f"{stem}_wt", w.T)])

    def _count(self, fmt: str, nbytes: int) -> None:
        self.formats[fmt] = self.formats.get(fmt, 0) + 1
        self.bytes += nbytes

    def _nbits(self, x: str, w: BlockWeight, stem: str) -> str:
        g = self.g
        n, k = w.shape
        blocks = k // BLOCK
        q = w.q.reshape(n, blocks, BLOCK)
        packed = pack_nibbles(q) if w.bits == 4 else q
        inputs = [x, g.const(f"{stem}_q", packed), g.const(f"{stem}_scales", w.scales.reshape(-1))]
        if w.bits == 4:  # explicit integer zero points
            inputs.append(g.const(f"{stem}_zp", pack_zero_points(np.full((n, blocks), w.offset), 4)))
        # 8 bits: no zero point input means 128, the offset of Q8_0 as stored here
        y = g.op1("MatMulNBits", inputs, domain=MS, K=k, N=n, bits=w.bits, block_size=BLOCK,
                  accuracy_level=self.accuracy_level)
        nbytes = packed.nbytes + w.scales.nbytes
        if w.mins is not None:  # Q4_1: + m · blocksum(x)
            sums = g.op1("ReduceSum", [g.op1("Reshape", [x, g.const("blocks_shape", np.array([-1, blocks, BLOCK]))]),
                                       g.const("axis2", np.array([2]))], keepdims=0)
            y = g.op1("Add", [y, g.op1("MatMul", [sums, g.const(f"{stem}_mins", w.mins.T)])])
            nbytes += w.mins.nbytes
        self._count(w.format, nbytes)
        return y


def fuse_rows(parts: Sequence) -> object:
    """Concatenate weights along N (Q, K, V -> QKV): blocks stay blocks when all parts share a format."""
    if all(isinstance(p, BlockWeight) for p in parts) and len({p.format for p in parts}) == 1:
        mins = None if parts[0].mins is None else np.concatenate([p.mins for p in parts])
        return BlockWeight(parts[0].format, np.concatenate([p.q for p in parts]),
                           np.concatenate([p.scales for p in parts]), mins)
    return np.concatenate([p.dequantize() if isinstance(p, BlockWeight) else p for p in parts])


def rotary_caches(config: TargetConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2], computed as the torch reference's RotaryEmbedding does."""
    import torch

    from dspark_trt.models.layers import RotaryEmbedding

    inv_freq = RotaryEmbedding.inv_freq_for(config.head_dim, config.rope_theta)
    freqs = torch.arange(max_positions).float().unsqueeze(-1) * inv_freq
    return freqs.cos().numpy(), freqs.sin().numpy()


def build_fused_target(config: TargetConfig, weights: dict, max_positions: int, tap_layers: Sequence[int] = (),
                       accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                       lm_head: str = "gguf") -> tuple[onnx.ModelProto, dict]:
    """(model, weight report) for parameters `weights` (name -> float32 [N, K] / [N] array or BlockWeight).

    lm_head: "gguf" (the head's own blocks, as the layers') or "fp32" (its exact float32 dequantization, a `Gemm`
    that reads the embedding table itself when the two are tied: no more weight bytes). On AVX2 the float32
    head was 1.2x faster for passes of 16-48 rows and 0.83x for a lone token (docs/benchmarks.md).

    Inputs and outputs are graphs/fused_target.py's contract; the report says which formats carry the
    matmuls and how many bytes their weights take.
    """
    if lm_head not in LM_HEADS:
        raise DSparkError(f"unknown LM head '{lm_head}': choose from {', '.join(LM_HEADS)}")
    if list(tap_layers) != sorted(set(tap_layers)):
        raise DSparkError(f"tap layers must be strictly increasing, got {list(tap_layers)}")
    cfg = config
    g = GraphBuilder()
    linear = _Linear(g, accuracy_level)
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps = float(cfg.rms_norm_eps)

    def dense(name):
        w = weights[name]
        return w.dequantize() if isinstance(w, BlockWeight) else np.asarray(w, dtype=np.float32)

    cos, sin = rotary_caches(cfg, max_positions)
    cos_name, sin_name = g.const("cos_cache", cos), g.const("sin_cache", sin)
    embed = g.const("embed_tokens", dense("embed_tokens.weight"))
    x = g.op1("Gather", [embed, "input_ids"], axis=0)
    tapped = []
    residual, pending = x, None  # pending: the sublayer output not yet added to the residual
    flat_shape = g.const("flat_shape", np.array([-1, heads * d]))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."

        def norm(weight_name):
            nonlocal residual, pending
            gamma = g.const(f"{p}{weight_name}", dense(p + weight_name))
            if pending is None:
                return g.op1("RMSNormalization", [residual, gamma], axis=-1, epsilon=eps)
            out = g.op("SkipSimplifiedLayerNormalization", [pending, residual, gamma], 4, domain=MS, epsilon=eps)
            residual, pending = out[3], None
            return out[0]

        a = norm("input_layernorm.weight")
        if i - 1 in tap_layers:  # the residual after layer i - 1 (the embeddings for -1)
            tapped.append(residual)
        qkv = linear(a, fuse_rows([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), f"{p}qkv")
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's q and k (GroupQueryAttention's own is CUDA-only)
            q, k, v = g.op("Split", [qkv, g.const("qkv_split", np.array([heads * d, kv * d, kv * d]))], 3, axis=-1)
            head_shape = g.const("head_shape", np.array([0, -1, d]))
            q, k = (g.op1("Reshape", [g.op1("RMSNormalization", [g.op1("Reshape", [t, head_shape]),
                                                                    g.const(f"{p}{n}_norm", dense(f"{p}self_attn.{n}_norm.weight"))],
                                            axis=-1, epsilon=eps), g.const("rows_shape", np.array([0, -1]))])
                    for t, n in ((q, "q"), (k, "k")))
            qkv = g.op1("Concat", [q, k, v], axis=-1)
        padded = g.op1("Gather", [qkv, "gather_rows"], axis=0)  # [B, S, (H + 2 KV)·d]
        past_k, past_v, present_k, present_v = cache_names(i)
        attn = g.op("GroupQueryAttention",
                    [padded, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", cos_name, sin_name,
                     "positions_padded", "", "", "", "", "", "", "query_lens"],
                    domain=MS, outputs=[g.name("attn"), present_k, present_v], num_heads=heads, kv_num_heads=kv,
                    do_rotary=1, rotary_interleaved=0, scale=float(d ** -0.5))[0]
        rows = g.op1("Gather", [g.op1("Reshape", [attn, flat_shape]), "row_slots"], axis=0)
        pending = linear(rows, weights[p + "self_attn.o_proj.weight"], f"{p}o")
        m = norm("post_attention_layernorm.weight")
        gate_up = linear(m, fuse_rows([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]),
                         f"{p}gate_up")
        gate, up = g.op("Split", [gate_up, g.const("split", np.array([cfg.intermediate_size] * 2))], 2, axis=-1)
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
        pending = linear(act, weights[p + "mlp.down_proj.weight"], f"{p}down")
    gamma = g.const("norm", dense("norm.weight"))
    final = g.op("SkipSimplifiedLayerNormalization", [pending, residual, gamma], 4, domain=MS, epsilon=eps)
    if cfg.num_layers - 1 in tap_layers:
        tapped.append(final[3])
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in weights
    head = weights["embed_tokens.weight"] if tied else weights["lm_head.weight"]
    rows = g.op1("Gather", [final[0], "logits_rows"], axis=0)
    if lm_head == "fp32":  # B [V, H] as stored, transposed by the Gemm
        b = embed if tied else g.const("lm_head", dense("lm_head.weight"))
        g.op("Gemm", [rows, b], outputs=["logits"], transB=1)
        linear._count("fp32", 0 if tied else head.shape[0] * head.shape[1] * 4)  # tied: the embedding's bytes
    else:
        linear(rows, head, "lm_head")
        g.nodes[-1].output[0] = "logits"  # the last node written is the head's (MatMul/MatMulNBits/Add)
    model = step_graph_model(g, cfg, tapped, "capacity", "dspark_target_fused", [helper.make_opsetid(MS, 1)])
    report = {"matmul_formats": dict(sorted(linear.formats.items())), "matmul_weight_bytes": int(linear.bytes),
              "accuracy_level": accuracy_level, "lm_head": lm_head}
    return model, report


def step_graph_model(g: GraphBuilder, cfg: TargetConfig, tapped: list[str], capacity, name: str,
                     opsets: list) -> onnx.ModelProto:
    """Finish a target step graph whose nodes wrote "logits" and the cache outputs: the logits' ArgMax (all
    greedy verification reads), the taps, and the contract's inputs and outputs (graphs/fused_target.py).
    capacity: the cache length dimension (a name, or TensorRT's fixed size). Shared by both flavours."""
    g.op("ArgMax", ["logits"], outputs=["argmax"], axis=-1, keepdims=0)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", cfg.vocab_size]),
               helper.make_tensor_value_info("argmax", TensorProto.INT64, ["rows"])]
    cache_shape = ["batch", cfg.num_kv_heads, capacity, cfg.head_dim]
    for i in range(cfg.num_layers):
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, cache_shape) for n in cache_names(i)[2:]]
    if tapped:
        g.op("Concat", tapped, outputs=["taps"], axis=-1)
        outputs.append(helper.make_tensor_value_info("taps", TensorProto.FLOAT,
                                                     ["tokens", len(tapped) * cfg.hidden_size]))
    inputs = [helper.make_tensor_value_info(name, dtype, dims) for name, (dtype, dims) in INPUTS.items()]
    for i in range(cfg.num_layers):
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, cache_shape) for n in cache_names(i)[:2]]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), *opsets])
    model.ir_version = 10
    return model


def fused_weights(target: str, model, weights: str) -> dict:
    """Parameter name -> weight for `weights` ("int4": the GGUF's blocks where it has them; "fp32": the
    reference model's float32 tensors)."""
    from dspark_trt.models.weights import load_block_weights

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if weights == "fp32":
        return state
    _, blocks = load_block_weights(target)
    if not blocks:
        raise DSparkError(f"--weights int4 takes the block-quantized weights of a GGUF file; '{target}' has none "
                          "(use a .gguf target or --weights fp32)")
    return state | blocks


def export_fused_target(target: str, model, path: str | Path, max_positions: int, tap_layers: Sequence[int] = (),
                        weights: str = "int4", accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                        verify: bool = True, lm_head: str = "gguf") -> tuple[Path, dict]:
    """Write the fused target graph (weights as external data next to it); returns (path, weight report)."""
    from dspark_trt.export.target_graph import add_verify_tail

    if weights not in WEIGHTS:
        raise DSparkError(f"unknown weights '{weights}': choose from {', '.join(WEIGHTS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_model, report = build_fused_target(model.config, fused_weights(target, model, weights), max_positions,
                                            tap_layers, accuracy_level, lm_head)
    if verify:
        add_verify_tail(onnx_model, model.config.vocab_size)
    data = path.with_suffix(".onnx.data")
    data.unlink(missing_ok=True)
    onnx.save(onnx_model, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
    if weights == "fp32":
        report.pop("accuracy_level")  # no MatMulNBits: nothing is quantized
    return path, report | {"weights": weights}
