"""The target step as one ONNX graph (the portable flavour: standard ONNX, float32), exported from the
torch reference. Its contract (inputs, feeds, cache layout) is graphs/target_graph.py's.

By default the graph ends in the DSparkVerify node (`add_verify_tail`; the tail's contract is
graphs/verify_tail.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.target_graph import INPUT_NAMES, output_names, step_inputs
from dspark_trt.graphs.verify_tail import VERIFY_INPUTS, VERIFY_NODE, VERIFY_OUTPUTS
from dspark_trt.models.layers import apply_rotary
from dspark_trt.models.target import TargetModel
from dspark_trt_plugins import ort_op

OPSET = 17
DYNAMIC_AXES = {
    "input_ids": {0: "tokens"}, "positions": {0: "tokens"},
    "past_k": {1: "requests", 3: "past"}, "past_v": {1: "requests", 3: "past"},
    "past_lens": {0: "requests"}, "query_lens": {0: "requests"},
    "gather_rows": {0: "requests", 1: "query"}, "row_slots": {0: "tokens"}, "logits_rows": {0: "rows"},
    "logits": {0: "rows"}, "new_k": {1: "tokens"}, "new_v": {1: "tokens"}, "taps": {0: "tokens"},
}


def padded_attention(q, k, v, past_k, past_v, mask, group: int, scale: float):
    """q [R,Q,H,d], k/v [R,Q,kv,d], past [R,kv,P,d], mask [R,Q,P+Q] bool -> [R,Q,H,d].

    group = query heads per K/V head (GQA by repeating K/V); scale = head_dim ** -0.5.
    """
    keys = torch.cat([past_k, k.transpose(1, 2)], dim=2)
    values = torch.cat([past_v, v.transpose(1, 2)], dim=2)
    if group > 1:  # a Python int: the graph holds no branch
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    scores = q.transpose(1, 2) @ keys.transpose(2, 3) * scale
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2)


class TargetStepGraph(nn.Module):
    """The exported computation; shares TargetModel's submodules, so weights and layers are one."""

    def __init__(self, model: TargetModel, tap_layers: Sequence[int] = ()):
        super().__init__()
        if list(tap_layers) != sorted(set(tap_layers)):
            raise DSparkError(f"tap layers must be strictly increasing, got {list(tap_layers)}")
        self.model = model
        self.tap_layers = tuple(tap_layers)

    def forward(self, input_ids, positions, past_k, past_v, past_lens, query_lens, gather_rows, row_slots,
                logits_rows):
        m = self.model
        r, q_len = gather_rows.shape
        p = past_k.shape[3]
        past_ok = torch.arange(p).unsqueeze(0) < past_lens.unsqueeze(1)  # [R, P]
        qi = torch.arange(q_len)
        new_ok = (qi.unsqueeze(0) <= qi.unsqueeze(1)).unsqueeze(0) & (qi < query_lens.unsqueeze(1)).unsqueeze(1)
        mask = torch.cat([past_ok.unsqueeze(1).expand(r, q_len, p), new_ok], dim=2)  # [R, Q, P+Q]
        x = m.embed_tokens(input_ids)
        tapped = [x] if -1 in self.tap_layers else []
        cos, sin = m.rotary(positions, x.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(m.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            t = h.shape[0]
            q = att.q_proj(h).view(t, att.num_heads, att.head_dim)
            k = att.k_proj(h).view(t, att.num_kv_heads, att.head_dim)
            v = att.v_proj(h).view(t, att.num_kv_heads, att.head_dim)
            if att.q_norm is not None:
                q, k = att.q_norm(q), att.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            new_k.append(k)
            new_v.append(v)
            out = padded_attention(q[gather_rows], k[gather_rows], v[gather_rows], past_k[i], past_v[i], mask,
                                   att.num_heads // att.num_kv_heads, att.head_dim ** -0.5)
            out = out.reshape(r * q_len, -1)[row_slots]
            x = x + att.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if i in self.tap_layers:
                tapped.append(x)
        logits = m.lm_head(m.norm(x[logits_rows])).float()
        outputs = (logits, torch.stack(new_k), torch.stack(new_v))
        return outputs + ((torch.cat(tapped, dim=-1),) if tapped else ())


def add_verify_tail(model: onnx.ModelProto, vocab: int) -> onnx.ModelProto:
    """Append Gather(logits, verify_rows) -> DSparkVerify, their inputs and outputs (in place)."""
    graph = model.graph
    types = {"verify_rows": onnx.TensorProto.INT64} | dict(ort_op.INPUTS) | dict(ort_op.OUTPUTS)

    def value(name, dims):
        return helper.make_tensor_value_info(name, types[name], [vocab if d == "vocab" else d for d in dims])

    graph.input.extend(value(name, dims) for name, dims in VERIFY_INPUTS.items())
    graph.output.extend(value(name, dims) for name, dims in VERIFY_OUTPUTS.items())
    graph.node.append(helper.make_node("Gather", ["logits", "verify_rows"], ["verify_logits"], axis=0,
                                       name="gather_verify_rows"))
    graph.node.append(ort_op.make_verify_node(["verify_logits", *list(VERIFY_INPUTS)[1:]], list(VERIFY_OUTPUTS),
                                              VERIFY_NODE))
    model.opset_import.append(ort_op.opset_import())
    return model


def example_inputs(model: TargetModel) -> dict[str, np.ndarray]:
    """A small ragged pass (2 requests over a non-empty cache) to trace the export with."""
    cfg = model.config
    shape = (cfg.num_layers, 2, cfg.num_kv_heads, 8, cfg.head_dim)
    rng = np.random.default_rng(0)
    cache = rng.standard_normal(shape).astype(np.float32)
    return step_inputs(rng.integers(0, cfg.vocab_size, 5), [0, 1], [3, 2], [2, 3], cache, cache, "all").feeds


def export_target(model: TargetModel, path: str | Path, tap_layers: Sequence[int] = (), verify: bool = True) -> Path:
    """Write the target step graph (float32 weights embedded) to path; verify: end in DSparkVerify."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = TargetStepGraph(model, tap_layers).eval()
    feeds = example_inputs(model)
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)
    with torch.no_grad():
        names = output_names(tap_layers)
        axes = {k: v for k, v in DYNAMIC_AXES.items() if k in INPUT_NAMES or k in names}
        torch.onnx.export(graph, args, str(path), input_names=INPUT_NAMES, output_names=names, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    if verify:
        onnx.save(add_verify_tail(onnx.load(str(path)), model.config.vocab_size), str(path))
    return path
