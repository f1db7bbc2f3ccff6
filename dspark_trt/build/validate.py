"""ONNX Runtime against the torch reference on random inputs, per graph of an engine directory.

The target is checked through both runtimes (two ragged passes of three requests, the second over
a non-empty cache, so the cache I/O is covered). The drafter's graphs are checked through OrtRuntime on
the target's taps: the `context` graph extends each request's context with the first half of its new
rows, then the one-call `draft` graph takes the rest and drafts (greedy, then at T>0 with and without
top-k/top-p, the same uniforms): its tokens, probabilities q, confidence logits, and the context K/V each
graph adds to the cache (a quantized drafter graph: its token agreement with torch). The target graph's DSparkVerify tail
is checked on a final pass at T>0 with top-k/top-p and random drafts: its accepted counts and tokens
must equal the torch reference's on the torch logits. Errors are max abs differences; `scale`
is the largest reference magnitude (float32 rounding grows with it). Entries are keyed "graph:output".
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dspark_trt.runtimes.ort_runtime import OrtRuntime
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.verify import dspark_verify

PASSES = ([5, 2, 7], [1, 3, 2])
VERIFY_PASS = [3, 1, 4]  # rows per request: anchor + 2, 0 and 3 drafts
MISMATCHES = {
    "draft_tokens_identical": "graph 'draft': the drafted tokens differ from torch",
    "verify_identical": "graph 'target', node 'dspark_verify': accepted counts or tokens differ from torch",
}


def compare(report: dict, key: str, ours, ref, greedy: bool = False) -> None:
    """Fold one output's max abs error and scale (and greedy agreement) into report[key] (shared by
    every flavour's validation)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    entry = report.setdefault(key, {"max_abs_error": 0.0, "scale": 0.0})
    entry["max_abs_error"] = max(entry["max_abs_error"], float(np.abs(ours - ref).max()))
    entry["scale"] = max(entry["scale"], float(np.abs(ref).max()))
    if greedy:
        same = bool((ours.argmax(-1) == ref.argmax(-1)).all())
        entry["greedy_identical"] = entry.get("greedy_identical", True) and same


def _compare_target(report: dict, key: str, ours, ref, quantized: bool) -> None:
    """As compare; logits also get the mean KL(reference || ours) and the share of rows whose argmax
    agrees. A quantized target (int4 weights, int8 activations) is judged by those, not by max abs error."""
    compare(report, key, ours, ref, greedy=key.endswith("logits") and not quantized)
    entry = report[key]
    entry["quantized"] = quantized
    if key.endswith("logits"):
        ref_logp, our_logp = torch.log_softmax(ref.double(), -1), torch.log_softmax(ours.double(), -1)
        kl = (ref_logp.exp() * (ref_logp - our_logp)).sum(-1)
        rows = entry.get("rows", 0) + kl.numel()
        entry["mean_kl"] = (entry.get("mean_kl", 0.0) * entry.get("rows", 0) + float(kl.sum())) / rows
        top1 = float((ours.argmax(-1) == ref.argmax(-1)).double().sum())
        entry["top1_agreement"] = (entry.get("top1_agreement", 1.0) * entry.get("rows", 0) + top1) / rows
        entry["rows"] = rows


@torch.inference_mode()
def validate_engines(engine_dir: str | Path, target, drafter=None, seed: int = 0) -> dict[str, dict]:
    """{"graph:output": {max_abs_error, scale, greedy_identical?}}, verify_identical (+ with a drafter,
    draft_tokens_identical, or draft_token_agreement for a quantized drafter graph)."""
    ref_rt = TorchRuntime(target, drafter, num_slots=3, max_seq_len=64)
    ort_rt = OrtRuntime(engine_dir, num_slots=3, max_seq_len=64, use_drafter=drafter is not None)
    quantized = ort_rt.manifest["target"].get("weights", "fp32") != "fp32"
    slots = torch.tensor([ref_rt.allocate_slot() for _ in range(3)])
    if [ort_rt.allocate_slot() for _ in range(3)] != slots.tolist():
        raise RuntimeError("the two runtimes allocated different slots")
    g = torch.Generator().manual_seed(seed)
    report: dict[str, dict] = {}
    states = [drafter.new_state() for _ in slots] if drafter is not None else []
    drafted = np.zeros(2, np.int64)  # tokens equal to torch's, tokens drafted
    for lens in PASSES:
        lens_t = torch.tensor(lens)
        ids = torch.randint(0, target.config.vocab_size, (sum(lens),), generator=g)
        ref = ref_rt.target_forward(ids, slots, lens_t, "all")
        ours = ort_rt.target_forward(ids, slots, lens_t, "all")
        _compare_target(report, "target:logits", ours.logits, ref.logits, quantized)
        if drafter is None:
            continue
        _compare_target(report, "target:taps", ours.taps, ref.taps, quantized)
        features = list(ref.taps.split(lens))
        anchors = torch.randint(0, target.config.vocab_size, (len(lens),), generator=g)
        drafted += _validate_draft(report, drafter, ort_rt, slots, states, features, anchors, g)
    if drafter is not None:
        if ort_rt.drafter.weights == "fp32":
            report["draft_tokens_identical"] = bool(drafted[0] == drafted[1])
        else:
            report["draft_token_agreement"] = float(drafted[0] / drafted[1])
    validate_verify(report, target.config.vocab_size, ref_rt, ort_rt, slots, g,
                    partial(_compare_target, quantized=quantized))
    return report


def validate_verify(report: dict, vocab: int, ref_rt, our_rt, slots: torch.Tensor, g: torch.Generator,
                    compare_logits: Callable[[dict, str, torch.Tensor, torch.Tensor], None]) -> None:
    """The target graph's DSparkVerify tail on a pass at T > 0 with top-k/top-p and random drafts (shared by
    every flavour's validation): its logits against torch (compare_logits), then its accepted counts and
    tokens against the reference's on the logits it verified ("verify_identical")."""
    lens = torch.tensor(VERIFY_PASS)
    n_rows, n_req = int(lens.sum()), len(VERIFY_PASS)
    ids = torch.randint(0, vocab, (n_rows,), generator=g)
    drafts = torch.randint(0, vocab, (n_rows - n_req,), generator=g)
    probs = torch.softmax(torch.randn(n_rows - n_req, vocab, generator=g), -1)
    sampling = (torch.tensor([0.0, 1.0, 0.8]), torch.tensor([0, 0, 3]), torch.tensor([1.0, 0.9, 1.0]),
                torch.rand(n_rows, generator=g))
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    ref_step = ref_rt.target_forward(ids, slots, lens, "all")
    step, ours = our_rt.target_verify(ids, slots, lens, drafts, probs, *sampling)
    compare_logits(report, "target:logits", step.logits, ref_step.logits)
    ref = dspark_verify(step.logits, drafts, probs, row_offsets, *sampling)
    report["verify_identical"] = bool(torch.equal(ours.accepted, ref.accepted)
                                      and torch.equal(ours.next_token, ref.next_token))


def context_split(features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each request's new rows in two (both non-empty from two rows on): the first half extends the draft contexts
    through the `context` graph (Runtime.extend_context), the rest goes with the draft pass (the `draft` graph)."""
    heads = [f[: (f.shape[0] + 1) // 2] for f in features]
    return heads, [f[h.shape[0]:] for f, h in zip(features, heads)]


def draft_sampling(r: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(temperature, top_k, top_p) of r requests for the draft passes that validation compares: greedy, then
    temperature only, then top-p alone, top-k with top-p and greedy mixed (each sampler branch of the graph,
    and with a reduced draft vocabulary the spread of q over the target vocabulary)."""
    ones, no_k = torch.ones(r), torch.zeros(r, dtype=torch.long)
    return [(torch.zeros(r), no_k, ones), (torch.full((r,), 0.7), no_k, ones),
            (torch.tensor([1.0, 0.8, 0.0] * r)[:r], torch.tensor([0, 5, 0] * r)[:r],
             torch.tensor([0.9, 0.9, 1.0] * r)[:r])]


def _validate_draft(report, drafter, ort_rt: OrtRuntime, slots, states, features, anchors, g) -> tuple[int, int]:
    """The drafter graphs through OrtRuntime against DSparkDrafter: the first rows of each request through the
    context graph (extend_context), then the draft graph greedy on the rest (which also extends both context
    caches; each graph's rows compared row for row), then on the same context at T>0, temperature only and
    with top-k/top-p, with the same uniforms. Returns (tokens equal to torch's, tokens drafted); a quantized
    graph (int8/int4 weights) cannot equal torch, so only that count is taken from it."""
    r, b = len(slots), drafter.config.block_size
    exact = ort_rt.drafter.weights == "fp32"
    heads, features = context_split(features)
    none = [torch.zeros(0, f.shape[1]) for f in features]
    starts = [state.length for state in states]
    ort_rt.extend_context(slots, heads)
    for state, rows in zip(states, heads):
        drafter.extend_context(state, rows)
    if exact:
        _compare_context(report, "context", drafter, ort_rt, slots, states, starts)
    starts = [state.length for state in states]
    agree = total = 0
    for i, sampling in enumerate(draft_sampling(r)):
        new = features if i == 0 else none
        uniforms = torch.rand(r, b, generator=g, dtype=torch.float64)
        ref = drafter.draft_batch(states, new, anchors, *sampling, uniforms)
        ours = ort_rt.draft(slots, new, anchors, *sampling, uniforms)
        agree, total = agree + int((ours.tokens == ref.tokens).sum()), total + ours.tokens.numel()
        if exact:
            compare(report, "draft:probs", ours.full_probs(ref.probs.shape[-1]), ref.probs)
            if drafter.confidence_head is not None:
                compare(report, "draft:confidence_logits", ours.confidence_logits, ref.confidence_logits)
    if exact:
        _compare_context(report, "draft", drafter, ort_rt, slots, states, starts)
    return agree, total


def _compare_context(report, graph: str, drafter, ort_rt: OrtRuntime, slots, states, starts: list[int]) -> None:
    """The context K/V rows `graph` added to OrtRuntime's cache (from starts[r] on) against the torch drafter's."""
    for slot, state, start in zip(slots.tolist(), states, starts):
        rows = slice(start, state.length)
        for layer in range(drafter.config.num_hidden_layers if state.length > start else 0):
            compare(report, f"{graph}:new_k", ort_rt.drafter._ctx_k[layer][slot, :, rows], state.keys[layer][:, rows])
            compare(report, f"{graph}:new_v", ort_rt.drafter._ctx_v[layer][slot, :, rows],
                    state.values[layer][:, rows])


# a quantized target passes when its next-token distributions on the random validation tokens stay this close
# to the float32 reference's (a broken graph is off by nats; int4 SmolLM2 measured about 0.045). Argmax
# agreement is reported, not judged: on random tokens the distributions are flat and argmaxes flip.
QUANTIZED_MAX_MEAN_KL = 0.1
# a quantized drafter graph passes when this share of its tokens equals the float32 torch drafter's
QUANTIZED_DRAFT_MIN_AGREEMENT = 0.5


def failures(report: dict, tolerance: float) -> list[str]:
    """Graphs whose error exceeds tolerance x max(1, scale), or whose greedy tokens differ; a quantized
    target's logits whose mean KL exceeds QUANTIZED_MAX_MEAN_KL."""
    problems = []
    for key, entry in report.items():
        if key == "draft_token_agreement":
            if entry < QUANTIZED_DRAFT_MIN_AGREEMENT:
                problems.append(f"graph 'draft': quantized weights: {entry:.2f} of its tokens equal torch's "
                                f"(at least {QUANTIZED_DRAFT_MIN_AGREEMENT})")
            continue
        if not isinstance(entry, dict):
            if entry is False:
                problems.append(MISMATCHES[key])
            continue
        graph, output = key.split(":")
        where = f"graph '{graph}', output '{output}'"
        if entry.get("quantized"):
            if "mean_kl" in entry and entry["mean_kl"] > QUANTIZED_MAX_MEAN_KL:
                problems.append(f"{where}: quantized target: mean KL {entry['mean_kl']:.3g} against float32 torch "
                                f"exceeds {QUANTIZED_MAX_MEAN_KL}")
            continue
        if entry["max_abs_error"] > tolerance * max(1.0, entry["scale"]):
            problems.append(f"{where}: max abs error {entry['max_abs_error']:.3g} exceeds "
                            f"{tolerance:g} x max(1, {entry['scale']:.3g})")
        if entry.get("greedy_identical") is False:
            problems.append(f"{where}: greedy tokens differ from torch")
    return problems
