"""The DSpark drafter as ONNX graphs: `draft`, a whole draft pass (context extension, block backbone, the
left-to-right Markov loop with sampling, the confidence head) in one ONNX Runtime call, and `context`, the
context extension alone (a request's new rows when it does not draft). Both compute the new rows' K/V with
one module, `ContextKV` (the torch drafter's own `context_kv`), so they write the same K/V for the same rows.

Their inputs and outputs are graphs/draft_graph.py's.

The block attends to [cached context ; new context ; block]; the Markov loop is unrolled over the block
with every weight at the top level of the graph (so ONNX Runtime prepacks them once). At each block
position `If` nodes pick the sampling variant from the pass's parameters: greedy (argmax; no softmax, q
left empty) when no request samples, else temperature only, else top-k/top-p (a TopK over the largest k
of the filtering requests; the whole vocabulary only for a top-p request without top-k). Sampling is
spec/sampling.py's step for step: temperature, top-k, top-p, renormalised; the one-hot of the argmax
below GREEDY_TEMPERATURE; the inverse-CDF draw on torch's cdf (float64 running sums rounded to float32),
found in two levels (blocks of CDF_BLOCK tokens, then inside the block) so no scan over V is sequential;
never a zero-probability token. A drafter with a reduced vocabulary samples over its N tokens (as
DSparkDrafter._sample_block): a Gather maps each drawn index to its target id (the next Markov input and
the output), and the sampled branches spread q over V with a Pad (one zero column) and a Gather, so
verification sees full-vocabulary q. weights="int8"/"int4" runs the big MatMuls on quantized weights
(export/weight_quant.py); the model's metadata says which.
"""
from __future__ import annotations

import copy
import io
from pathlib import Path

import onnx
import torch
from onnx import helper
from torch import nn

from dspark_trt.export.weight_quant import (ACCURACY_LEVEL, BLOCK_SIZE, WEIGHT_FORMATS, inline_initializer_identities,
                                            quantize_matmuls)
from dspark_trt.graphs.draft_graph import CONTEXT_INPUTS, CONTEXT_OUTPUTS, INPUTS, METADATA_WEIGHTS
from dspark_trt.models.drafter import DSparkDrafter
from dspark_trt.models.layers import apply_rotary
from dspark_trt.spec.sampling import is_greedy, sample_from_uniform, warp_probs

OPSET = 17
SAMPLING_INPUTS = ["temperature", "top_k", "top_p", "uniforms"]
VARIANTS = ("greedy", "sample", "filter", "nucleus")
SAMPLER_INPUTS = ["logit", "temperature", "top_k", "top_p", "uniform"]
FULL_INDEX = "full_index"  # the sampler's extra input with a reduced draft vocabulary (_FullProbs)
PLACEHOLDER_DOMAIN = "dspark.draft"  # the export's Sample placeholder, replaced by If nodes before saving
CDF_BLOCK = 128  # tokens per block of the two-level inverse-CDF draw
NUCLEUS_BUCKETS = 64  # probability buckets floor(-log2 q) bounding a top-p nucleus (the last takes the rest)
NUCLEUS_MARGIN = 1e-4  # mass beyond top_p the bound covers (float rounding is ~1e-7)


def _attention(q, keys, values, mask, att, b: int):
    """q [R, B, H, d], keys/values [R, kv, S, d], mask [R, S] bool -> [R, B, H*d]; query head h reads K/V head
    h // (H / kv) (grouped-query attention without repeating K/V). Sizes come from the config and only R is
    left to -1, so the graph holds constant shapes rather than Shape/Gather/Concat chains."""
    h, kv, d = att.n_heads, att.n_kv, att.head_dim
    g = h // kv
    q = q.reshape(-1, b, kv, g, d).permute(0, 2, 3, 1, 4).reshape(-1, kv, g * b, d)
    scores = (q @ keys.transpose(2, 3)) * d ** -0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ values  # [R, kv, g*B, d]
    return out.reshape(-1, kv, g, b, d).permute(0, 3, 1, 2, 4).reshape(-1, b, h * d)


class ContextKV(nn.Module):
    """New context rows' K/V: features [N, taps*H] at positions [N] -> per draft layer k, v [N, kv, d], by
    DSparkDrafter.context_kv (the torch reference's code). The `context` graph is this module alone; the `draft`
    graph's Backbone runs it too."""

    def __init__(self, drafter: DSparkDrafter):
        super().__init__()
        self.drafter = drafter

    def layers(self, features, positions) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k.transpose(0, 1), v.transpose(0, 1)) for k, v in self.drafter.context_kv(features, positions)]

    def forward(self, features, positions):
        """new_k, new_v [L, N, kv, d]."""
        return _stacked(self.layers(features, positions))


def _stacked(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


class Backbone(nn.Module):
    """The parallel stage: the new rows' context K/V, then the block over [cached ; new ; block] -> hidden, U."""

    def __init__(self, drafter: DSparkDrafter):
        super().__init__()
        self.drafter = drafter
        self.context = ContextKV(drafter)

    def forward(self, anchors, ctx_lens, ctx_k, ctx_v, features, positions, new_rows, new_lens):
        d, cfg = self.drafter, self.drafter.config
        b, p, m = cfg.block_size, ctx_k.shape[3], new_rows.shape[1]
        context = self.context.layers(features, positions)
        block_ids = torch.cat([anchors.unsqueeze(1), torch.full_like(anchors, cfg.mask_token_id).unsqueeze(1)
                               .expand(-1, b - 1)], dim=1)
        x = d.embed_tokens(block_ids)
        cos, sin = d.rotary((ctx_lens + new_lens).unsqueeze(1) + torch.arange(b), x.dtype)
        mask = torch.cat([torch.arange(p).unsqueeze(0) < ctx_lens.unsqueeze(1),
                          torch.arange(m).unsqueeze(0) < new_lens.unsqueeze(1),
                          torch.ones_like(anchors, dtype=torch.bool).unsqueeze(1).expand(-1, b)], dim=1)
        for i, (layer, (ck, cv)) in enumerate(zip(d.layers, context)):
            att = layer.self_attn
            a = layer.input_layernorm(x)
            q = apply_rotary(att.q_norm(att.q_proj(a).view(-1, b, att.n_heads, att.head_dim)), cos, sin)
            k = apply_rotary(att.k_norm(att.k_proj(a).view(-1, b, att.n_kv, att.head_dim)), cos, sin)
            v = att.v_proj(a).view(-1, b, att.n_kv, att.head_dim)
            keys = torch.cat([ctx_k[i], ck[new_rows].transpose(1, 2), k.transpose(1, 2)], dim=2)
            values = torch.cat([ctx_v[i], cv[new_rows].transpose(1, 2), v.transpose(1, 2)], dim=2)
            x = x + att.o_proj(_attention(q, keys, values, mask, att, b))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = d.norm(x)
        return (hidden, d.lm_head(hidden).float(), *_stacked(context))


class _TopK(torch.autograd.Function):
    """torch.topk with k a tensor [1], exported as ONNX TopK with a dynamic k (the tracer would freeze an int)."""

    @staticmethod
    def forward(ctx, x, k):
        return torch.topk(x, int(k), dim=-1, largest=True, sorted=True)

    @staticmethod
    def symbolic(g, x, k):
        return g.op("TopK", x, k, axis_i=-1, largest_i=1, sorted_i=1, outputs=2)


def _draw(probs, uniform, top, vocab: int):
    """spec.sampling.sample_from_uniform in two levels, so that no O(V) scan is sequential: the cdf is torch's
    (float64 running sums rounded to float32), block sums of CDF_BLOCK tokens find the block where
    uniform * total falls, a cumulative sum inside that block the token. A draw that lands on a
    zero-probability token (only when uniform * total rounds up to the total) takes `top`, the row's top
    token, where spec.sampling takes the argmax of q (the same token but for ties in q)."""
    blocks = (vocab + CDF_BLOCK - 1) // CDF_BLOCK
    padded = nn.functional.pad(probs, (0, blocks * CDF_BLOCK - vocab)) if vocab % CDF_BLOCK else probs  # V is static
    p = padded.double().reshape(-1, blocks, CDF_BLOCK)
    block_cdf = p.sum(-1).cumsum(-1)  # [R, blocks] float64
    target = uniform.unsqueeze(1) * block_cdf[:, -1:].float()
    block = (block_cdf.float() <= target).sum(-1).clamp(max=blocks - 1)  # the block holding the draw
    before = torch.cat([torch.zeros_like(block_cdf[:, :1]), block_cdf[:, :-1]], dim=1).gather(1, block.unsqueeze(1))
    inside = p.reshape(-1, blocks * CDF_BLOCK).gather(1, block.unsqueeze(1) * CDF_BLOCK + torch.arange(CDF_BLOCK))
    cdf = (before + inside.cumsum(-1)).float()
    idx = (block * CDF_BLOCK + (cdf <= target).sum(-1)).clamp(max=vocab - 1)
    return torch.where(probs.gather(1, idx.unsqueeze(1))[:, 0] > 0, idx, top)


def _nucleus_bound(probs, top_p):
    """Per row, a number of top tokens that holds the top-p nucleus, without sorting: tokens fall into buckets
    floor(-log2 q) (each bucket's probabilities above the next one's), and the nucleus lies within the
    buckets up to the first whose cumulative mass (float64) reaches top_p + NUCLEUS_MARGIN, plus two more
    (a log2 rounded across a bucket edge moves a token by one bucket)."""
    buckets = (-torch.log2(probs)).floor().clamp(0, NUCLEUS_BUCKETS - 1).long()
    zeros = torch.zeros_like(top_p, dtype=torch.float64).unsqueeze(1).repeat(1, NUCLEUS_BUCKETS)
    mass = zeros.scatter_add(1, buckets, probs.double()).cumsum(-1)
    count = zeros.scatter_add(1, buckets, torch.ones_like(probs, dtype=torch.float64)).cumsum(-1)
    reached = (mass < (top_p.double() + NUCLEUS_MARGIN).unsqueeze(1)).sum(-1)
    return count.gather(1, (reached + 2).clamp(max=NUCLEUS_BUCKETS - 1).unsqueeze(1))[:, 0].long()


def _filter(scaled, top_k, top_p, filtering, nucleus: bool, vocab: int):
    """spec.sampling._mask_top_k_top_p on the rows `filtering` (the others are returned as they are). The
    sort covers the largest k of the filtering rows; nucleus (some filtering row has top-p without top-k):
    such a row's sort stops at a bound of its nucleus (_nucleus_bound), its sorted q read from the full
    softmax."""
    k_row = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    k_sort = k_row
    if nucleus:
        probs = torch.softmax(scaled, dim=-1)
        k_sort = torch.where(top_k > 0, k_row, _nucleus_bound(probs, top_p).clamp(1, vocab))
    values, order = _TopK.apply(scaled, torch.where(filtering, k_sort, torch.ones_like(k_sort)).max().reshape(1))
    rank = torch.arange(values.shape[-1]).unsqueeze(0)
    drop = rank >= k_row.unsqueeze(1)
    sorted_probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
    if nucleus:  # a row without top-k normalises over the whole vocabulary, not the sorted prefix
        sorted_probs = torch.where((top_k == 0).unsqueeze(1), probs.gather(1, order), sorted_probs)
    mass_before = sorted_probs.double().cumsum(-1).float() - sorted_probs
    drop = (drop | ((mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1))) & (rank > 0)
    kept = torch.full_like(scaled, float("-inf")).scatter(1, order, values.masked_fill(drop, float("-inf")))
    return torch.where(filtering.unsqueeze(1), kept, scaled)


def full_index(draft_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per target id its draft id, or N (the zero column _FullProbs appends) outside the draft vocabulary."""
    index = torch.full((vocab,), draft_ids.numel(), dtype=torch.long)
    index[draft_ids] = torch.arange(draft_ids.numel())
    return index


class _FullProbs(torch.autograd.Function):
    """q [R, N] over the draft vocabulary -> [R, V] over the target vocabulary, zero outside the draft vocabulary:
    one zero column appended, then a Gather at `index` (full_index). Exported as one Pad with constant pads (the
    exporter's own pad lowering leaves a chain of shape ops) and one Gather, which TensorRT takes."""

    @staticmethod
    def forward(ctx, q, index):
        return nn.functional.pad(q, (0, 1)).index_select(1, index)

    @staticmethod
    def symbolic(g, q, index):
        pads = g.op("Constant", value_t=torch.tensor([0, 0, 0, 1]))
        return g.op("Gather", g.op("Pad", q, pads, mode_s="constant"), index, axis_i=1)


def _warp_and_draw(logits, temperature, top_k, top_p, uniform, variant: str, vocab: int):
    """(token [R], q [R, V]) as spec.sampling.warp_probs + sample_from_uniform; variant "sample" leaves
    top-k/top-p out, "filter" and "nucleus" apply them (_filter)."""
    greedy = is_greedy(temperature)
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    if variant != "sample":
        scaled = _filter(scaled, top_k, top_p, ~greedy & ((top_k > 0) | (top_p < 1.0)), variant == "nucleus", vocab)
    top = logits.argmax(-1)
    probs = torch.softmax(scaled, dim=-1)
    one_hot = torch.zeros_like(probs).scatter(1, top.unsqueeze(1), 1.0)
    probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    return _draw(probs, uniform, top, vocab), probs


class _Sample(torch.autograd.Function):
    """One block position's warp-and-draw, exported as a placeholder node that `_expand_sampling` replaces by
    If nodes over the Sampler variants; run as spec.sampling itself, so the torch module computes what the
    graph does. Inputs: the three variant flags, then the Sampler's inputs (SAMPLER_INPUTS, and FULL_INDEX
    with a reduced draft vocabulary: q is then spread over the target vocabulary, the token stays a draft id)."""

    @staticmethod
    def forward(ctx, any_sampling, any_filter, any_nucleus, logit, temperature, top_k, top_p, uniform, index=None):
        q = warp_probs(logit, temperature, top_k, top_p)
        return sample_from_uniform(q, uniform), q if index is None else _FullProbs.apply(q, index)

    @staticmethod
    def symbolic(g, *inputs):
        token, q = g.op(f"{PLACEHOLDER_DOMAIN}::Sample", *inputs, outputs=2)
        logit, temperature = inputs[3:5]
        token.setType(temperature.type().with_dtype(torch.int64))
        q.setType(logit.type())
        return token, q


class Sampler(nn.Module):
    """One variant of a block position's sampling over a vocabulary of `vocab`: greedy (argmax; q left
    empty), sample (temperature), filter (temperature, top-k, top-p with top-k) or nucleus (besides, top-p
    without top-k). Given a full_index (a reduced draft vocabulary), q comes back over the target vocabulary."""

    def __init__(self, variant: str, vocab: int):
        super().__init__()
        self.variant, self.vocab = variant, vocab

    def forward(self, logit, temperature, top_k, top_p, uniform, index=None):
        if self.variant == "greedy":
            return logit.argmax(-1), logit[:, :0]
        token, q = _warp_and_draw(logit, temperature, top_k, top_p, uniform, self.variant, self.vocab)
        return token, q if index is None else _FullProbs.apply(q, index)


class DraftPass(nn.Module):
    """The whole pass: backbone, then the drafter's own Markov loop (DSparkDrafter.markov_loop), each x_k drawn
    from warp(ℓ_k) by the Sample placeholder (If nodes over the Sampler variants in the saved graph). With a
    reduced draft vocabulary x_k is drawn as a draft id and mapped to its target id (draft_ids) before it goes on."""

    def __init__(self, drafter: DSparkDrafter):
        super().__init__()
        self.drafter = drafter
        self.backbone = Backbone(drafter)
        self.reduced = drafter.config.reduced_vocab
        if self.reduced:
            self.register_buffer("draft_ids", drafter.draft_ids.clone())
            self.register_buffer("full_index", full_index(drafter.draft_ids, drafter.config.vocab_size))

    def forward(self, anchors, ctx_lens, ctx_k, ctx_v, features, positions, new_rows, new_lens, temperature, top_k,
                top_p, uniforms):
        d = self.drafter
        hidden, base_logits, new_k, new_v = self.backbone(anchors, ctx_lens, ctx_k, ctx_v, features, positions,
                                                          new_rows, new_lens)
        sampling = ~is_greedy(temperature)
        any_sampling = sampling.any()
        any_filter = (sampling & ((top_k > 0) | (top_p < 1.0))).any()
        any_nucleus = (sampling & (top_k == 0) & (top_p < 1.0)).any()

        def draw(k: int, logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            token, q = _Sample.apply(any_sampling, any_filter, any_nucleus, logit, temperature, top_k, top_p,
                                     uniforms[:, k], *([self.full_index] if self.reduced else []))
            return (self.draft_ids[token] if self.reduced else token), q

        tokens, probs, _, conf = d.markov_loop(anchors, hidden, base_logits, draw)
        return (tokens, probs, *([] if conf is None else [conf]), new_k, new_v)


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], axes: dict) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, buffer, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          custom_opsets={PLACEHOLDER_DOMAIN: 1})
    return onnx.load_from_string(buffer.getvalue())


def _example(drafter: DSparkDrafter) -> dict[str, torch.Tensor]:
    """Feeds of two requests (3 cached rows and 2 new, 5 cached and 1 new), the second one filtering."""
    cfg = drafter.config
    kv_shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 5, cfg.head_dim)
    return {"anchors": torch.tensor([1, 2]), "ctx_lens": torch.tensor([3, 5]), "ctx_k": torch.randn(kv_shape),
            "ctx_v": torch.randn(kv_shape), "features": torch.randn(3, cfg.num_taps * cfg.hidden_size),
            "positions": torch.tensor([3, 4, 5]), "new_rows": torch.tensor([[0, 1], [2, 0]]),
            "new_lens": torch.tensor([2, 1]), "temperature": torch.tensor([0.0, 0.8]),
            "top_k": torch.tensor([0, 3]), "top_p": torch.tensor([1.0, 0.9]),
            "uniforms": torch.rand(2, cfg.block_size)}


def export_drafter(drafter: DSparkDrafter, out_dir: str | Path, weights: str = "fp32") -> dict[str, Path]:
    """Write the drafter's graphs into out_dir as draft.onnx and context.onnx; returns {name: path}.

    weights: "fp32" (exactly the torch drafter), "int8" or "int4": the big MatMuls on quantized weights
    (export/weight_quant.py; int8 is the faster of the two from R = 4 on, and as fast at R = 1), the same in
    both graphs, so that their context K/V stay equal."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ex = _example(drafter)
    outputs = ["tokens", "probs"] + (["confidence_logits"] if drafter.confidence_head is not None else [])
    outputs += CONTEXT_OUTPUTS
    requests, rows = {0: "requests"}, {0: "tokens"}
    context_axes = {"features": rows, "positions": rows, "new_k": {1: "tokens"}, "new_v": {1: "tokens"}}
    axes = {name: requests for name in INPUTS + outputs} | context_axes | {
        "ctx_k": {1: "requests", 3: "context"}, "ctx_v": {1: "requests", 3: "context"},
        "new_rows": {0: "requests", 1: "query"}, "probs": {0: "requests", 2: "vocab"}}
    draft_pass = DraftPass(drafter)
    model = _export(draft_pass, tuple(ex[n] for n in INPUTS), INPUTS, outputs, axes)
    vocab = drafter.config.output_vocab_size
    sampler_args = (torch.randn(2, vocab), *(ex[name] for name in SAMPLING_INPUTS[:3]), ex["uniforms"][:, 0])
    sampler_inputs = SAMPLER_INPUTS
    if draft_pass.reduced:
        sampler_args, sampler_inputs = (*sampler_args, draft_pass.full_index), [*SAMPLER_INPUTS, FULL_INDEX]
    samplers = {v: _export(Sampler(v, vocab), sampler_args, sampler_inputs, ["token", "q"],
                           {name: requests for name in SAMPLER_INPUTS})
                for v in VARIANTS}
    _expand_sampling(model.graph, {v: m.graph for v, m in samplers.items()})
    context = _export(ContextKV(drafter), tuple(ex[n] for n in CONTEXT_INPUTS), CONTEXT_INPUTS, CONTEXT_OUTPUTS,
                      context_axes)
    return {"draft": _save(model, weights, out_dir / "draft.onnx"),
            "context": _save(context, weights, out_dir / "context.onnx")}


def _save(model: onnx.ModelProto, weights: str, path: Path) -> Path:
    """Write an exported graph with its MatMuls in the `weights` format, named in the model's metadata."""
    inline_initializer_identities(model)
    props = {METADATA_WEIGHTS: weights}
    if weights != "fp32":
        quantize_matmuls(model, weights)
        if weights == "int4":
            props.update({"dspark.weight_block_size": str(BLOCK_SIZE), "dspark.accuracy_level": str(ACCURACY_LEVEL)})
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def _expand_sampling(graph: onnx.GraphProto, samplers: dict[str, onnx.GraphProto]) -> None:
    """Replace every placeholder Sample node by If(any_sampling: If(any_filter: If(any_nucleus: nucleus |
    filter) | sample) | greedy), the branches being the exported Sampler graphs reading the node's inputs
    (in place)."""
    for j, node in enumerate(graph.node):
        if node.domain != PLACEHOLDER_DOMAIN:
            continue
        any_sampling, any_filter, any_nucleus, *args = node.input
        prefix = f"sample{j}"
        branches = {v: _branch(samplers[v], f"{prefix}/{v}", args) for v in VARIANTS}
        filtered = _if_graph(f"{prefix}/filtered", any_nucleus, branches["nucleus"], branches["filter"])
        sampled = _if_graph(f"{prefix}/sampled", any_filter, filtered, branches["sample"])
        node.CopyFrom(helper.make_node("If", [any_sampling], list(node.output), name=f"{prefix}/if_sampling",
                                       then_branch=sampled, else_branch=branches["greedy"]))
    for value in graph.output:
        if value.name == "probs":  # a greedy pass leaves it [R, B, 0]
            value.type.tensor_type.shape.dim[2].Clear()
            value.type.tensor_type.shape.dim[2].dim_param = "vocab"
    del graph.value_info[:]


def _if_graph(name: str, condition: str, then_branch: onnx.GraphProto, else_branch: onnx.GraphProto):
    """A branch graph holding one If node whose (token, q) it returns."""
    outputs = [_value(f"{name}/token", onnx.TensorProto.INT64, 1), _value(f"{name}/q", onnx.TensorProto.FLOAT, 2)]
    node = helper.make_node("If", [condition], [o.name for o in outputs], name=f"{name}/if",
                            then_branch=then_branch, else_branch=else_branch)
    return helper.make_graph([node], name, [], outputs)


def _value(name: str, elem_type: int, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, [None] * rank)


def _branch(sampler: onnx.GraphProto, prefix: str, args: list[str]) -> onnx.GraphProto:
    """A Sampler graph as an If branch: its inputs read `args` of the outer scope, everything else gets the prefix."""
    names = [*SAMPLER_INPUTS, FULL_INDEX]
    outer = {i.name: args[names.index(i.name)] for i in sampler.input}  # (the exporter drops unused ones)

    def rename(name: str) -> str:
        return outer.get(name, f"{prefix}/{name}") if name else name

    def renamed(graph: onnx.GraphProto) -> onnx.GraphProto:
        graph = copy.deepcopy(graph)
        for init in graph.initializer:
            init.name = rename(init.name)
        for node in graph.node:
            node.name = f"{prefix}/{node.name}"
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    attr.g.CopyFrom(renamed(attr.g))
        for value in [*graph.output, *graph.value_info]:
            value.name = rename(value.name)
        return graph

    graph = renamed(sampler)
    del graph.input[:]
    graph.name = prefix
    return graph
