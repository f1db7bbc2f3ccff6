"""The DSpark drafter as one ONNX graph: a whole draft pass (context extension, block backbone, the
left-to-right Markov loop with sampling, the confidence head) in one ONNX Runtime call.

`draft` inputs (R requests, B = block size, L draft layers, V vocabulary):
  anchors [R] int64            each request's last committed token (block slot 0)
  ctx_lens [R] int64           context rows already cached per request
  ctx_k, ctx_v [L, R, kv, P, d] float32   the cached context K/V window (rows >= ctx_lens[r] are ignored)
  features [N, taps*H] float32 the target features new since each request's last pass, request-major; a
                               pass with none feeds one row that no request reads (new_lens all 0)
  positions [N] int64          each new row's position (its request's ctx_lens + i)
  new_rows [R, M] int64        per request, the indices of its new rows in `features` (padding: any index)
  new_lens [R] int64           new rows per request
  temperature [R] float32, top_k [R] int64, top_p [R] float32   spec.sampling's parameters per request
  uniforms [R, B] float32      the engine's uniform numbers, one per block position
outputs:
  tokens [R, B] int64
  probs [R, B, V] float32      the distribution q each token was drawn from; [R, B, 0] when every request is
                               greedy (q is then the one-hot of the token, left to the runtime)
  confidence_logits [R, B] float32   (only with a confidence head)
  new_k, new_v [L, N, kv, d] float32  the new rows' context K/V, to be cached at (request, position)

The block attends to [cached context ; new context ; block]. Sampling is spec/sampling.py's, step for step
(temperature, top-k, top-p, renormalised; one-hot argmax below GREEDY_TEMPERATURE; inverse-CDF draw with
the cumulative sum accumulated in float64 as torch's CPU cumsum does; never a zero-probability token). The
sequential stage comes in three exported variants, chosen inside the graph by `If` nodes from the sampling
parameters: greedy (argmax chain, no softmax), sample (temperature only) and filter (top-k/top-p: a TopK
over max(k) of the filtering rows, the whole vocabulary only for a top-p row without top-k). The variants
share every weight (one copy at the top level). `weights="int8"`/`"int4"` stores the big MatMuls as
`com.microsoft::MatMulNBits` (export/weight_quant.py); the model's metadata says which.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from dspark_trt.export.weight_quant import (ACCURACY_LEVEL, BLOCK_SIZE, WEIGHT_FORMATS, inline_initializer_identities,
                                            quantize_matmuls)
from dspark_trt.models.drafter import DSparkDrafter
from dspark_trt.models.layers import apply_rotary
from dspark_trt.spec.sampling import GREEDY_TEMPERATURE

OPSET = 17
GRAPH_NAMES = ("draft",)
INPUTS = ["anchors", "ctx_lens", "ctx_k", "ctx_v", "features", "positions", "new_rows", "new_lens",
          "temperature", "top_k", "top_p", "uniforms"]
SAMPLING_INPUTS = ["temperature", "top_k", "top_p", "uniforms"]
VARIANTS = ("greedy", "sample", "filter")
METADATA_WEIGHTS = "dspark.weights"


def _attention(q, keys, values, mask, scale: float):
    """q [R, B, H, d], keys/values [R, kv, S, d], mask [R, S] bool -> [R, B, H*d]; query head h reads K/V head
    h // (H / kv) (grouped-query attention without repeating K/V)."""
    r, b, h, d = q.shape
    kv = keys.shape[1]
    q = q.reshape(r, b, kv, h // kv, d).permute(0, 2, 3, 1, 4).reshape(r, kv, (h // kv) * b, d)
    scores = (q @ keys.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ values  # [R, kv, g*B, d]
    return out.reshape(r, kv, h // kv, b, d).permute(0, 3, 1, 2, 4).reshape(r, b, h * d)


class Backbone(nn.Module):
    """The parallel stage: the new rows' context K/V, then the block over [cached ; new ; block] -> hidden, U."""

    def __init__(self, drafter: DSparkDrafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, anchors, ctx_lens, ctx_k, ctx_v, features, positions, new_rows, new_lens):
        d, cfg = self.drafter, self.drafter.config
        r, b, p, m, n = anchors.shape[0], cfg.block_size, ctx_k.shape[3], new_rows.shape[1], features.shape[0]
        ctx = d.hidden_norm(d.fc(features))
        ctx_cos, ctx_sin = d.rotary(positions, ctx.dtype)
        block_ids = torch.cat([anchors.unsqueeze(1), torch.full_like(anchors, cfg.mask_token_id).unsqueeze(1)
                               .expand(r, b - 1)], dim=1)
        x = d.embed_tokens(block_ids)
        cos, sin = d.rotary((ctx_lens + new_lens).unsqueeze(1) + torch.arange(b), x.dtype)
        mask = torch.cat([torch.arange(p).unsqueeze(0) < ctx_lens.unsqueeze(1),
                          torch.arange(m).unsqueeze(0) < new_lens.unsqueeze(1),
                          torch.ones(r, b, dtype=torch.bool)], dim=1)
        new_k, new_v = [], []
        for i, layer in enumerate(d.layers):
            att = layer.self_attn
            ck = apply_rotary(att.k_norm(att.k_proj(ctx).view(n, att.n_kv, att.head_dim)), ctx_cos, ctx_sin)
            cv = att.v_proj(ctx).view(n, att.n_kv, att.head_dim)
            new_k.append(ck)
            new_v.append(cv)
            a = layer.input_layernorm(x)
            q = apply_rotary(att.q_norm(att.q_proj(a).view(r, b, att.n_heads, att.head_dim)), cos, sin)
            k = apply_rotary(att.k_norm(att.k_proj(a).view(r, b, att.n_kv, att.head_dim)), cos, sin)
            v = att.v_proj(a).view(r, b, att.n_kv, att.head_dim)
            keys = torch.cat([ctx_k[i], ck[new_rows].transpose(1, 2), k.transpose(1, 2)], dim=2)
            values = torch.cat([ctx_v[i], cv[new_rows].transpose(1, 2), v.transpose(1, 2)], dim=2)
            x = x + att.o_proj(_attention(q, keys, values, mask, att.head_dim ** -0.5))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = d.norm(x)
        return hidden, d.lm_head(hidden).float(), torch.stack(new_k), torch.stack(new_v)


class _TopK(torch.autograd.Function):
    """torch.topk with k a tensor [1], exported as ONNX TopK with a dynamic k (the tracer would freeze an int)."""

    @staticmethod
    def forward(ctx, x, k):
        return torch.topk(x, int(k), dim=-1, largest=True, sorted=True)

    @staticmethod
    def symbolic(g, x, k):
        return g.op("TopK", x, k, axis_i=-1, largest_i=1, sorted_i=1, outputs=2)


def _draw(probs, uniform):
    """spec.sampling.sample_from_uniform: inverse CDF (float32 cumsum accumulated in float64, as torch's CPU
    cumsum), searchsorted(right) as a count, clamped, a zero-probability landing replaced by the argmax."""
    cdf = probs.double().cumsum(-1).float()
    target = uniform.unsqueeze(1) * cdf[:, -1:]
    idx = (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1)
    bad = probs.gather(1, idx.unsqueeze(1)).squeeze(1) <= 0
    return torch.where(bad, probs.argmax(-1), idx)


def _filter(scaled, top_k, top_p, filtering):
    """spec.sampling._mask_top_k_top_p on the rows `filtering` (the others are returned as they are). The
    sort covers max(k) of the filtering rows, all of V only for a row with top-p and no top-k."""
    vocab = scaled.shape[-1]
    k_row = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    values, order = _TopK.apply(scaled, torch.where(filtering, k_row, torch.ones_like(k_row)).max().reshape(1))
    rank = torch.ones_like(order).cumsum(-1) - 1
    drop = rank >= k_row.unsqueeze(1)
    sorted_probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = sorted_probs.double().cumsum(-1).float() - sorted_probs
    drop = (drop | (mass_before >= top_p.unsqueeze(1))) & (rank > 0)
    kept = torch.full_like(scaled, float("-inf")).scatter(1, order, values.masked_fill(drop, float("-inf")))
    return torch.where(filtering.unsqueeze(1), kept, scaled)


def _warp_and_draw(logits, temperature, top_k, top_p, uniform, filter_rows: bool):
    """(token [R], q [R, V]) as spec.sampling.warp_probs + sample_from_uniform."""
    greedy = temperature < GREEDY_TEMPERATURE
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    if filter_rows:
        scaled = _filter(scaled, top_k, top_p, ~greedy & ((top_k > 0) | (top_p < 1.0)))
    probs = torch.softmax(scaled, dim=-1)
    one_hot = torch.zeros_like(probs).scatter(1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    return _draw(probs, uniform), probs


class MarkovLoop(nn.Module):
    """The sequential stage of one variant: ℓ_k = U_k + B_k(x_{k-1}), x_k drawn from warp(ℓ_k), left to
    right (as DSparkDrafter._sample_block); then the confidence logits from the drawn prefix."""

    def __init__(self, drafter: DSparkDrafter, variant: str):
        super().__init__()
        self.drafter, self.variant = drafter, variant

    def forward(self, hidden, base_logits, anchors, temperature, top_k, top_p, uniforms):
        d = self.drafter
        head = d.markov_head
        state = head.initial_state(hidden.shape[0], hidden) if head is not None else None
        prev, prevs, tokens, probs = anchors, [], [], []
        for k in range(d.config.block_size):
            logit = base_logits[:, k]
            if head is not None:
                bias, state = head.step(prev, hidden[:, k], state)
                logit = logit + bias.float()
            if self.variant == "greedy":
                token = logit.argmax(-1)
            else:
                token, q = _warp_and_draw(logit, temperature, top_k, top_p, uniforms[:, k], self.variant == "filter")
                probs.append(q)
            prevs.append(prev)
            tokens.append(token)
            prev = token
        outputs = [torch.stack(tokens, 1), torch.stack(probs, 1) if probs else base_logits[:, :, :0]]
        if d.confidence_head is not None:
            outputs.append(d.confidence_logits(hidden, torch.stack(prevs, 1)))
        return tuple(outputs)


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], axes: dict) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, buffer, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _example(drafter: DSparkDrafter) -> dict[str, torch.Tensor]:
    """Feeds of two requests (3 cached rows and 2 new, 5 cached and 1 new), the second one filtering."""
    cfg = drafter.config
    kv_shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 5, cfg.head_dim)
    b = cfg.block_size
    return {"anchors": torch.tensor([1, 2]), "ctx_lens": torch.tensor([3, 5]), "ctx_k": torch.randn(kv_shape),
            "ctx_v": torch.randn(kv_shape), "features": torch.randn(3, cfg.num_taps * cfg.hidden_size),
            "positions": torch.tensor([3, 4, 5]), "new_rows": torch.tensor([[0, 1], [2, 0]]),
            "new_lens": torch.tensor([2, 1]), "temperature": torch.tensor([0.0, 0.8]),
            "top_k": torch.tensor([0, 3]), "top_p": torch.tensor([1.0, 0.9]),
            "uniforms": torch.rand(2, b)}


def export_drafter(drafter: DSparkDrafter, out_dir: str | Path, weights: str = "fp32") -> dict[str, Path]:
    """Write the drafter's graph into out_dir as draft.onnx; returns {"draft": path}.

    weights: "fp32" (exactly the torch drafter), or "int8"/"int4" (the big MatMuls as MatMulNBits)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ex = _example(drafter)
    requests = {0: "requests"}
    backbone_in = INPUTS[:8]
    backbone = _export(
        Backbone(drafter), tuple(ex[n] for n in backbone_in), backbone_in, ["hidden", "base_logits", "new_k", "new_v"],
        {"anchors": requests, "ctx_lens": requests, "ctx_k": {1: "requests", 3: "context"},
         "ctx_v": {1: "requests", 3: "context"}, "features": {0: "tokens"}, "positions": {0: "tokens"},
         "new_rows": {0: "requests", 1: "query"}, "new_lens": requests, "hidden": requests, "base_logits": requests,
         "new_k": {1: "tokens"}, "new_v": {1: "tokens"}})
    with torch.no_grad():
        hidden, base_logits, _, _ = Backbone(drafter)(*(ex[n] for n in backbone_in))
    loop_in = ["hidden", "base_logits", "anchors", *SAMPLING_INPUTS]
    loop_out = ["tokens", "probs"] + (["confidence_logits"] if drafter.confidence_head is not None else [])
    loop_args = (hidden, base_logits, ex["anchors"], *(ex[n] for n in SAMPLING_INPUTS))
    loops = {variant: _export(MarkovLoop(drafter, variant), loop_args, loop_in, loop_out,
                              {name: requests for name in loop_in + loop_out})
             for variant in VARIANTS}
    model = _compose(backbone, loops, loop_out)
    inline_initializer_identities(model)
    props = {METADATA_WEIGHTS: weights}
    if weights != "fp32":
        quantize_matmuls(model, weights)
        props.update({"dspark.weight_block_size": str(BLOCK_SIZE), "dspark.accuracy_level": str(ACCURACY_LEVEL)})
    helper.set_model_props(model, props)
    path = out_dir / "draft.onnx"
    onnx.save(model, str(path))
    return {"draft": path}


def _compose(backbone: onnx.ModelProto, loops: dict[str, onnx.ModelProto], loop_outputs: list[str]) -> onnx.ModelProto:
    """One graph: the backbone, then If(any request samples: If(any request filters: filter | sample) | greedy)
    with each variant's sequential stage as a branch. Branch initializers move to the top level, one copy per
    distinct tensor (the variants share the Markov and confidence weights)."""
    graph = backbone.graph
    inputs = {i.name: i for i in graph.input}
    for loop in loops.values():  # sampling inputs the backbone does not take
        inputs.update({i.name: i for i in loop.graph.input if i.name in SAMPLING_INPUTS})
    shared: dict[bytes, str] = {}
    for init in graph.initializer:
        shared.setdefault(_digest(init), init.name)
    branches = {variant: _branch(loop.graph, variant, graph, shared) for variant, loop in loops.items()}
    greedy = helper.make_tensor("greedy_temperature", onnx.TensorProto.FLOAT, [], [GREEDY_TEMPERATURE])
    graph.initializer.extend([greedy, helper.make_tensor("one_f", onnx.TensorProto.FLOAT, [], [1.0]),
                              helper.make_tensor("zero_i", onnx.TensorProto.INT64, [], [0])])
    samples = [helper.make_node("GreaterOrEqual", ["temperature", "greedy_temperature"], ["mode/sampling_rows"]),
               helper.make_node("Cast", ["mode/sampling_rows"], ["mode/sampling_rows_i"], to=onnx.TensorProto.INT64),
               helper.make_node("ReduceMax", ["mode/sampling_rows_i"], ["mode/any_sampling_i"], keepdims=0),
               helper.make_node("Greater", ["mode/any_sampling_i", "zero_i"], ["mode/any_sampling"]),
               helper.make_node("Greater", ["top_k", "zero_i"], ["mode/top_k_on"]),
               helper.make_node("Less", ["top_p", "one_f"], ["mode/top_p_on"]),
               helper.make_node("Or", ["mode/top_k_on", "mode/top_p_on"], ["mode/filter_on"]),
               helper.make_node("And", ["mode/filter_on", "mode/sampling_rows"], ["mode/filter_rows"]),
               helper.make_node("Cast", ["mode/filter_rows"], ["mode/filter_rows_i"], to=onnx.TensorProto.INT64),
               helper.make_node("ReduceMax", ["mode/filter_rows_i"], ["mode/any_filter_i"], keepdims=0),
               helper.make_node("Greater", ["mode/any_filter_i", "zero_i"], ["mode/any_filter"])]
    outputs = [loops["filter"].graph.output[i] for i in range(len(loop_outputs))]
    sampling_branch = helper.make_graph(
        [helper.make_node("If", ["mode/any_filter"], [f"sampled/{o}" for o in loop_outputs],
                          then_branch=branches["filter"], else_branch=branches["sample"])],
        "sampling", [], [_renamed(o, f"sampled/{o.name}") for o in outputs])
    graph.node.extend(samples + [helper.make_node("If", ["mode/any_sampling"], loop_outputs,
                                                  then_branch=sampling_branch, else_branch=branches["greedy"])])
    new_kv = [o for o in graph.output if o.name in ("new_k", "new_v")]
    del graph.output[:]
    graph.output.extend([_renamed(o, o.name) for o in outputs] + new_kv)
    del graph.input[:]
    graph.input.extend(inputs[name] for name in INPUTS)
    del graph.value_info[:]
    return backbone


def _digest(tensor: onnx.TensorProto) -> bytes:
    """A tensor's content (type, shape, data), whatever its name."""
    unnamed = onnx.TensorProto()
    unnamed.CopyFrom(tensor)
    unnamed.name = ""
    return hashlib.sha256(unnamed.SerializeToString(deterministic=True)).digest()


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(value)
    out.name = name
    if name.endswith("probs"):  # the greedy branch leaves it [R, B, 0]
        out.type.tensor_type.shape.dim[2].Clear()
        out.type.tensor_type.shape.dim[2].dim_param = "probs_vocab"
    return out


def _branch(loop: onnx.GraphProto, variant: str, top: onnx.GraphProto, shared: dict[bytes, str]) -> onnx.GraphProto:
    """The loop graph as an If branch: its inputs read the outer scope (same names), its values get a prefix,
    its initializers join the top level's (deduplicated by content)."""
    outer = {i.name for i in loop.input}
    rename = {}
    for init in loop.initializer:
        key = _digest(init)
        if key not in shared:
            shared[key] = f"{variant}/{init.name}"
            moved = onnx.TensorProto()
            moved.CopyFrom(init)
            moved.name = shared[key]
            top.initializer.append(moved)
        rename[init.name] = shared[key]
    nodes = []
    for node in loop.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{variant}/{node.name}"
        for i, name in enumerate(copy.input):
            if name and name not in outer:
                copy.input[i] = rename.get(name, f"{variant}/{name}")
        for i, name in enumerate(copy.output):
            copy.output[i] = f"{variant}/{name}"
        nodes.append(copy)
    outputs = [_renamed(o, f"{variant}/{o.name}") for o in loop.output]
    return helper.make_graph(nodes, variant, [], outputs)


def draft_feeds(slots, anchors, ctx_lens, cache_k, cache_v, new_features, feature_width: int, temperature, top_k,
                top_p, uniforms) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(feeds of `draft`, the slot and position of every row of new_k/new_v) for requests in `slots` whose
    context caches (per layer [num_slots, kv, max_seq, d]) hold ctx_lens rows; new_features[r] [n_r,
    feature_width] (or None) are request r's new rows. A row of new_k/new_v whose slot is -1 is padding."""
    slots = np.asarray(slots, dtype=np.int64)
    ctx_lens = np.asarray(ctx_lens, dtype=np.int64)
    r = len(slots)
    arrays = [np.asarray(f, dtype=np.float32) if f is not None else None for f in new_features]
    new_lens = np.array([0 if a is None else a.shape[0] for a in arrays], dtype=np.int64)
    rows = [a for a in arrays if a is not None and a.shape[0] > 0]
    n = int(new_lens.sum())
    p, m = max(1, int(ctx_lens.max())), max(1, int(new_lens.max()))
    if n:
        features = np.concatenate(rows)
        starts = np.concatenate([[0], np.cumsum(new_lens)[:-1]])
        positions = np.concatenate([ctx_lens[i] + np.arange(new_lens[i]) for i in range(r)])
        row_slots = np.repeat(slots, new_lens)
    else:  # one row nobody reads
        features = np.zeros((1, feature_width), np.float32)
        starts, positions, row_slots = np.zeros(r, np.int64), np.zeros(1, np.int64), np.full(1, -1)
    new_rows = np.minimum(starts[:, None] + np.arange(m), max(n, 1) - 1)
    feeds = {"anchors": np.asarray(anchors, dtype=np.int64), "ctx_lens": ctx_lens,
             "ctx_k": np.stack([layer[slots, :, :p] for layer in cache_k]),
             "ctx_v": np.stack([layer[slots, :, :p] for layer in cache_v]),
             "features": features, "positions": positions.astype(np.int64), "new_rows": new_rows.astype(np.int64),
             "new_lens": new_lens, "temperature": np.asarray(temperature, dtype=np.float32),
             "top_k": np.asarray(top_k, dtype=np.int64), "top_p": np.asarray(top_p, dtype=np.float32),
             "uniforms": np.asarray(uniforms, dtype=np.float32)}
    return feeds, row_slots, positions
