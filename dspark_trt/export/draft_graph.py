"""The DSpark drafter as ONNX graphs: context K/V, block backbone, one Markov step, confidence head.

- `draft_context`: new target features [n, taps*H] at their positions -> every draft layer's context
  K/V [L, n, kv_heads, head_dim] (computed once per context token; the runtime caches them per slot).
- `draft_block`: R anchors with each request's cached context K/V window [L, R, kv_heads, P, head_dim]
  (entries at or beyond ctx_lens[r] are masked; the block sits at positions ctx_lens[r] ..) -> block
  hidden states [R, B, H] after the final norm and the parallel logits U [R, B, V].
- `draft_markov_step`: B_k for previous tokens [R] and hidden [R, H] (and the RNN state) -> [R, V].
- `draft_confidence`: confidence logits [R, B] from hidden [R, B, H] and the previous tokens [R, B].

The left-to-right loop (U_k + B_k, warp, draw) stays on the host so that sampling goes through
`spec.sampling` with the engine's uniforms; it calls `draft_markov_step` once per block position.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dspark_trt.export.target_graph import OPSET, gather_past, padded_attention
from dspark_trt.models.drafter import DSparkDrafter
from dspark_trt.models.layers import apply_rotary

GRAPH_NAMES = ("draft_context", "draft_block", "draft_markov_step", "draft_confidence")


class ContextGraph(nn.Module):
    def __init__(self, drafter: DSparkDrafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, features, positions):
        d = self.drafter
        ctx = d.hidden_norm(d.fc(features))
        cos, sin = d.rotary(positions, ctx.dtype)
        keys, values = [], []
        n = ctx.shape[0]
        for layer in d.layers:
            att = layer.self_attn
            keys.append(apply_rotary(att.k_norm(att.k_proj(ctx).view(n, att.n_kv, att.head_dim)), cos, sin))
            values.append(att.v_proj(ctx).view(n, att.n_kv, att.head_dim))
        return torch.stack(keys), torch.stack(values)


class BlockGraph(nn.Module):
    def __init__(self, drafter: DSparkDrafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, anchors, ctx_lens, ctx_k, ctx_v):
        d, cfg = self.drafter, self.drafter.config
        r, b, p = anchors.shape[0], cfg.block_size, ctx_k.shape[3]
        block_ids = torch.cat([anchors.unsqueeze(1), torch.full_like(anchors, cfg.mask_token_id).unsqueeze(1)
                               .expand(r, b - 1)], dim=1)
        x = d.embed_tokens(block_ids)
        cos, sin = d.rotary(ctx_lens.unsqueeze(1) + torch.arange(b), x.dtype)
        ctx_ok = (torch.arange(p).unsqueeze(0) < ctx_lens.unsqueeze(1)).unsqueeze(1).expand(r, b, p)
        mask = torch.cat([ctx_ok, torch.ones(r, b, b, dtype=torch.bool)], dim=2)
        for i, layer in enumerate(d.layers):
            att = layer.self_attn
            a = layer.input_layernorm(x)
            q = apply_rotary(att.q_norm(att.q_proj(a).view(r, b, att.n_heads, att.head_dim)), cos, sin)
            k = apply_rotary(att.k_norm(att.k_proj(a).view(r, b, att.n_kv, att.head_dim)), cos, sin)
            v = att.v_proj(a).view(r, b, att.n_kv, att.head_dim)
            out = padded_attention(q, k, v, ctx_k[i], ctx_v[i], mask, att.n_heads // att.n_kv, att.head_dim ** -0.5)
            x = x + att.o_proj(out.reshape(r, b, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = d.norm(x)
        return hidden, d.lm_head(hidden).float()


class MarkovStepGraph(nn.Module):
    def __init__(self, drafter: DSparkDrafter):
        super().__init__()
        self.head = drafter.markov_head
        self.recurrent = self.head.initial_state(1, torch.zeros(1)) is not None

    def forward(self, prev, hidden, state=None):
        bias, new_state = self.head.step(prev, hidden, state)
        return (bias.float(), new_state) if self.recurrent else bias.float()


class ConfidenceGraph(nn.Module):
    def __init__(self, drafter: DSparkDrafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, hidden, prev_tokens):
        d = self.drafter
        features = hidden
        if d.confidence_head.proj.in_features > d.config.hidden_size:
            features = torch.cat([hidden, d.markov_head.markov_w1(prev_tokens)], dim=-1)
        return d.confidence_head(features).float()


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> Path:
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return path


def export_drafter(drafter: DSparkDrafter, out_dir: str | Path) -> dict[str, Path]:
    """Write the drafter's graphs into out_dir as <name>.onnx; returns name -> path (heads only if present)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = drafter.config
    h, r, b = cfg.hidden_size, 2, cfg.block_size
    kv_shape = (cfg.num_hidden_layers, r, cfg.num_key_value_heads, 5, cfg.head_dim)
    paths = {
        "draft_context": _export(
            ContextGraph(drafter), (torch.randn(3, cfg.num_taps * h), torch.arange(2, 5)),
            out_dir / "draft_context.onnx", ["features", "positions"], ["ctx_k", "ctx_v"],
            {"features": {0: "tokens"}, "positions": {0: "tokens"}, "ctx_k": {1: "tokens"}, "ctx_v": {1: "tokens"}}),
        "draft_block": _export(
            BlockGraph(drafter), (torch.tensor([1, 2]), torch.tensor([5, 3]), torch.randn(kv_shape),
                                  torch.randn(kv_shape)),
            out_dir / "draft_block.onnx", ["anchors", "ctx_lens", "ctx_k", "ctx_v"], ["hidden", "base_logits"],
            {"anchors": {0: "requests"}, "ctx_lens": {0: "requests"}, "ctx_k": {1: "requests", 3: "context"},
             "ctx_v": {1: "requests", 3: "context"}, "hidden": {0: "requests"}, "base_logits": {0: "requests"}}),
    }
    if drafter.markov_head is not None:
        step = MarkovStepGraph(drafter)
        args, inputs, outputs = (torch.tensor([1, 2]), torch.randn(r, h)), ["prev", "hidden"], ["bias"]
        if step.recurrent:
            args, inputs, outputs = args + (torch.randn(r, cfg.markov_rank),), inputs + ["state"], ["bias", "new_state"]
        paths["draft_markov_step"] = _export(step, args, out_dir / "draft_markov_step.onnx", inputs, outputs,
                                             {name: {0: "requests"} for name in inputs + outputs})
    if drafter.confidence_head is not None:
        paths["draft_confidence"] = _export(
            ConfidenceGraph(drafter), (torch.randn(r, b, h), torch.tensor([[1] * b, [2] * b])),
            out_dir / "draft_confidence.onnx", ["hidden", "prev_tokens"], ["confidence_logits"],
            {"hidden": {0: "requests"}, "prev_tokens": {0: "requests"}, "confidence_logits": {0: "requests"}})
    return paths


def block_inputs(anchors, ctx_lens, cache_k: np.ndarray, cache_v: np.ndarray, slots) -> dict[str, np.ndarray]:
    """Feeds of draft_block for slots whose context caches (per layer [num_slots, kv, max_seq, d]) hold
    ctx_lens rows."""
    ctx_lens = np.asarray(ctx_lens, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    p = max(1, int(ctx_lens.max()))
    return {"anchors": np.asarray(anchors, dtype=np.int64), "ctx_lens": ctx_lens,
            "ctx_k": gather_past(cache_k, slots, p), "ctx_v": gather_past(cache_v, slots, p)}
