"""ONNX Runtime against the torch reference on random inputs, per graph of an engine directory.

The target is checked through both runtimes (two ragged passes of three requests, the second over
a non-empty cache, so the cache I/O is covered). The drafter's backbone (context + block graphs) is
checked through both runtimes on the target's taps; the Markov step and confidence graphs are fed the
torch reference's own inputs so each graph's error is its own. The target graph's DSparkVerify tail
is checked on a final pass at T>0 with top-k/top-p and random drafts: its accepted counts and tokens
must equal the torch reference's on the torch logits. Errors are max abs differences; `scale`
is the largest reference magnitude (float32 rounding grows with it). Entries are keyed "graph:output".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dspark_trt.export.ort_session import run
from dspark_trt.runtimes.ort_runtime import OrtRuntime
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.verify import dspark_verify

PASSES = ([5, 2, 7], [1, 3, 2])
VERIFY_PASS = [3, 1, 4]  # rows per request: anchor + 2, 0 and 3 drafts
MISMATCHES = {
    "draft_tokens_identical": "graphs draft_*: the drafted greedy tokens differ from torch",
    "verify_identical": "graph 'target', node 'dspark_verify': accepted counts or tokens differ from torch",
}


def _compare(report: dict, key: str, ours, ref, greedy: bool = False) -> None:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    entry = report.setdefault(key, {"max_abs_error": 0.0, "scale": 0.0})
    entry["max_abs_error"] = max(entry["max_abs_error"], float(np.abs(ours - ref).max()))
    entry["scale"] = max(entry["scale"], float(np.abs(ref).max()))
    if greedy:
        same = bool((ours.argmax(-1) == ref.argmax(-1)).all())
        entry["greedy_identical"] = entry.get("greedy_identical", True) and same


@torch.inference_mode()
def validate_engines(engine_dir: str | Path, target, drafter=None, seed: int = 0) -> dict[str, dict]:
    """{"graph:output": {max_abs_error, scale, greedy_identical?}}, verify_identical (+ draft_tokens_identical
    with a drafter)."""
    ref_rt = TorchRuntime(target, drafter, num_slots=3, max_seq_len=64)
    ort_rt = OrtRuntime(engine_dir, num_slots=3, max_seq_len=64, use_drafter=drafter is not None)
    slots = torch.tensor([ref_rt.allocate_slot() for _ in range(3)])
    if [ort_rt.allocate_slot() for _ in range(3)] != slots.tolist():
        raise RuntimeError("the two runtimes allocated different slots")
    g = torch.Generator().manual_seed(seed)
    report: dict[str, dict] = {}
    states = [drafter.new_state() for _ in slots] if drafter is not None else []
    for lens in PASSES:
        lens_t = torch.tensor(lens)
        ids = torch.randint(0, target.config.vocab_size, (sum(lens),), generator=g)
        ref = ref_rt.target_forward(ids, slots, lens_t, "all")
        ours = ort_rt.target_forward(ids, slots, lens_t, "all")
        _compare(report, "target:logits", ours.logits, ref.logits, greedy=True)
        if drafter is None:
            continue
        _compare(report, "target:taps", ours.taps, ref.taps)
        features = list(ref.taps.split(lens))
        anchors = torch.randint(0, target.config.vocab_size, (len(lens),), generator=g)
        _validate_draft(report, drafter, ort_rt, slots, states, features, anchors)
    _validate_verify(report, target.config.vocab_size, ref_rt, ort_rt, slots, g)
    return report


def _validate_verify(report, vocab: int, ref_rt, ort_rt: OrtRuntime, slots, g: torch.Generator) -> None:
    lens = torch.tensor(VERIFY_PASS)
    n_rows, n_req = int(lens.sum()), len(VERIFY_PASS)
    ids = torch.randint(0, vocab, (n_rows,), generator=g)
    drafts = torch.randint(0, vocab, (n_rows - n_req,), generator=g)
    probs = torch.softmax(torch.randn(n_rows - n_req, vocab, generator=g), -1)
    sampling = (torch.tensor([0.0, 1.0, 0.8]), torch.tensor([0, 0, 3]), torch.tensor([1.0, 0.9, 1.0]),
                torch.rand(n_rows, generator=g))
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    ref_step = ref_rt.target_forward(ids, slots, lens, "all")
    ref = dspark_verify(ref_step.logits, drafts, probs, row_offsets, *sampling)
    step, ours = ort_rt.target_verify(ids, slots, lens, drafts, probs, *sampling)
    _compare(report, "target:logits", step.logits, ref_step.logits, greedy=True)
    report["verify_identical"] = bool(torch.equal(ours.accepted, ref.accepted)
                                      and torch.equal(ours.next_token, ref.next_token))


def _validate_draft(report, drafter, ort_rt: OrtRuntime, slots, states, features, anchors) -> None:
    r, b = len(slots), drafter.config.block_size
    greedy = (torch.zeros(r), torch.zeros(r, dtype=torch.long), torch.ones(r))
    ref = drafter.draft_batch(states, features, anchors, *greedy, None)
    hidden, base = ort_rt.drafter.backbone(slots, features, anchors)
    _compare(report, "draft_block:base_logits", base, ref.base_logits, greedy=True)
    _compare(report, "draft_block:hidden", hidden, ref.block_hidden)
    prevs = torch.cat([anchors[:, None], ref.tokens[:, :-1]], dim=1)
    head = drafter.markov_head
    if head is not None:
        state = head.initial_state(r, ref.block_hidden)
        for k in range(b):
            bias, new_state = head.step(prevs[:, k], ref.block_hidden[:, k], state)
            feeds = {"prev": prevs[:, k].numpy(), "hidden": ref.block_hidden[:, k].numpy()}
            if state is not None:
                feeds["state"] = state.numpy()
            ours = run(ort_rt.drafter.sessions["draft_markov_step"], feeds)
            _compare(report, "draft_markov_step:bias", ours[0], bias)
            if state is not None:
                _compare(report, "draft_markov_step:new_state", ours[1], new_state)
            state = new_state
    if drafter.confidence_head is not None:
        (conf,) = run(ort_rt.drafter.sessions["draft_confidence"],
                      {"hidden": ref.block_hidden.numpy(), "prev_tokens": prevs.numpy()})
        _compare(report, "draft_confidence:confidence_logits", conf, ref.confidence_logits)
    ours = ort_rt.draft(slots, [None] * r, anchors, *greedy, None)  # the whole draft path, context as is
    same = bool((ours.tokens == ref.tokens).all())
    report["draft_tokens_identical"] = report.get("draft_tokens_identical", True) and same


def failures(report: dict, tolerance: float) -> list[str]:
    """Graphs whose error exceeds tolerance x max(1, scale), or whose greedy tokens differ."""
    problems = []
    for key, entry in report.items():
        if not isinstance(entry, dict):
            if entry is False:
                problems.append(MISMATCHES[key])
            continue
        graph, output = key.split(":")
        where = f"graph '{graph}', output '{output}'"
        if entry["max_abs_error"] > tolerance * max(1.0, entry["scale"]):
            problems.append(f"{where}: max abs error {entry['max_abs_error']:.3g} exceeds "
                            f"{tolerance:g} x max(1, {entry['scale']:.3g})")
        if entry.get("greedy_identical") is False:
            problems.append(f"{where}: greedy tokens differ from torch")
    return problems
