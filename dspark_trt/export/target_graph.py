"""The target step as one ONNX graph: a ragged batch over a past-K/V window, returning the new K/V.

Layout (chosen so ONNX Runtime runs it with plain batched MatMuls on CPU): the runtime keeps the slot
cache itself and passes, for the R requests of this pass, their past K/V stacked over layers
[L, R, kv_heads, P, head_dim] (P = longest past in the batch, at least 1; entries at or beyond a
request's past length are masked). The T new tokens stay flat for the projections and the MLP; for
attention they are gathered into a padded [R, Q] layout (Q = longest query) and scattered back. The
graph returns the new tokens' K/V [L, T, kv_heads, head_dim], which the runtime writes into its cache
at (slot, position) of each row: rollback stays a length change on the host.

By default the graph ends in the DSparkVerify node (plugins/SCHEMA.md), appended to the exported
graph: it verifies the logits rows picked by `verify_rows`, grouped into requests by `row_offsets`,
against the draft tokens/probs with per-request sampling parameters and the given uniforms, and
returns `accepted` and `next_token` besides the logits, K/V and taps. A pass that verifies nothing
feeds `no_verify_feeds` (zero rows: the node costs nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from dspark_trt.errors import DSparkError
from dspark_trt.models.layers import apply_rotary
from dspark_trt.models.target import TargetModel
from dspark_trt_plugins import ort_op

OPSET = 17
INPUT_NAMES = ["input_ids", "positions", "past_k", "past_v", "past_lens", "query_lens", "gather_rows",
               "row_slots", "logits_rows"]
DYNAMIC_AXES = {
    "input_ids": {0: "tokens"}, "positions": {0: "tokens"},
    "past_k": {1: "requests", 3: "past"}, "past_v": {1: "requests", 3: "past"},
    "past_lens": {0: "requests"}, "query_lens": {0: "requests"},
    "gather_rows": {0: "requests", 1: "query"}, "row_slots": {0: "tokens"}, "logits_rows": {0: "rows"},
    "logits": {0: "rows"}, "new_k": {1: "tokens"}, "new_v": {1: "tokens"}, "taps": {0: "tokens"},
}
# the verification tail: graph inputs (besides the logits it verifies) and outputs, with their dims;
# "vocab" stands for the vocabulary size. Verify requests are logits-row groups, not query requests.
VERIFY_INPUTS = {"verify_rows": ["verify_rows"], "draft_tokens": ["drafts"], "draft_probs": ["drafts", "vocab"],
                 "row_offsets": ["verify_offsets"], "temperature": ["verify_requests"],
                 "top_k": ["verify_requests"], "top_p": ["verify_requests"], "uniforms": ["verify_rows"]}
VERIFY_OUTPUTS = {"accepted": ["verify_requests"], "next_token": ["verify_requests"]}
VERIFY_NODE = "dspark_verify"


def output_names(tap_layers: Sequence[int], verify: bool = False) -> list[str]:
    return ["logits", "new_k", "new_v"] + (["taps"] if tap_layers else []) + (list(VERIFY_OUTPUTS) if verify else [])


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


@dataclass
class TargetStepInputs:
    """Numpy feeds for one pass, plus where each new row goes in the slot cache."""

    feeds: dict[str, np.ndarray]
    row_slot_ids: np.ndarray  # [T] cache slot of each new row
    row_positions: np.ndarray  # [T] cache position of each new row


def gather_past(cache, slots: np.ndarray, length: int) -> np.ndarray:
    """[L, R, kv_heads, length, head_dim]: the first `length` positions of each slot, every layer."""
    return np.stack([layer[slots, :, :length] for layer in cache])


def step_inputs(input_ids, slots, starts, query_lens, cache_k: np.ndarray, cache_v: np.ndarray,
                logits_rows: str | Sequence[int] = "last") -> TargetStepInputs:
    """Feeds for appending query_lens[r] tokens to slots[r], whose caches hold starts[r] positions.

    cache_k/cache_v: the runtime's cache, per layer [num_slots, kv_heads, max_seq, head_dim] (a list of
    arrays or one stacked array).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(query_lens, dtype=np.int64)
    if lens.sum() != ids.size or (lens < 1).any():
        raise DSparkError(f"query lengths {lens.tolist()} must be positive and sum to {ids.size} tokens")
    max_seq = cache_k[0].shape[2]
    if (starts + lens > max_seq).any():
        raise DSparkError(f"a request exceeds the cache limit {max_seq}")
    r, q_len, total = lens.size, int(lens.max()), int(lens.sum())
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    request_of_row = np.repeat(np.arange(r), lens)
    offset_in_request = np.arange(total) - first[request_of_row]
    gather_rows = np.zeros((r, q_len), dtype=np.int64)
    gather_rows[request_of_row, offset_in_request] = np.arange(total)
    p = max(1, int(starts.max()))
    if logits_rows == "last":
        rows = first + lens - 1
    elif logits_rows == "all":
        rows = np.arange(total)
    else:
        rows = np.asarray(logits_rows, dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "positions": (starts[request_of_row] + offset_in_request).astype(np.int64),
        "past_k": gather_past(cache_k, slots, p), "past_v": gather_past(cache_v, slots, p),
        "past_lens": starts, "query_lens": lens, "gather_rows": gather_rows,
        "row_slots": (request_of_row * q_len + offset_in_request).astype(np.int64),
        "logits_rows": rows.astype(np.int64),
    }
    return TargetStepInputs(feeds, slots[request_of_row], feeds["positions"])


def verify_feeds(verify_rows, draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p,
                 uniforms) -> dict[str, np.ndarray]:
    """The verification tail's feeds (torch or numpy in; the dtypes the graph takes out).

    verify_rows: the logits rows (indices into this pass's logits output) to verify, request-major;
    the rest as DSparkVerify's inputs in plugins/SCHEMA.md.
    """
    def arr(x, dtype):
        return np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=dtype)

    return {"verify_rows": arr(verify_rows, np.int64), "draft_tokens": arr(draft_tokens, np.int64),
            "draft_probs": arr(draft_probs, np.float32), "row_offsets": arr(row_offsets, np.int64),
            "temperature": arr(temperature, np.float32), "top_k": arr(top_k, np.int64),
            "top_p": arr(top_p, np.float32), "uniforms": arr(uniforms, np.float32)}


def no_verify_feeds(vocab: int) -> dict[str, np.ndarray]:
    """Feeds for a pass that verifies nothing: zero rows, zero requests."""
    return verify_feeds(np.zeros(0), np.zeros(0), np.zeros((0, vocab)), np.zeros(1), np.zeros(0), np.zeros(0),
                        np.zeros(0), np.zeros(0))


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
