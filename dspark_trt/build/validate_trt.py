"""build-engines' validate step for a TensorRT-flavour engine directory (--backend tensorrt): the graph that
TensorRT compiles, run on ONNX Runtime with TensorRT's KV-cache update and attention emulated, against the
torch reference. Same report format as build/validate.py (its `failures` reads it)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from dspark_trt.build.validate import compare, context_split, draft_sampling, validate_verify
from dspark_trt.errors import DSparkError
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.runtimes.trt_runtime import TrtEmulationRuntime

VALIDATION_PASSES = ([5, 2, 7], [1, 3, 2])  # ragged passes of slots 0..2 over a growing cache
ROLLBACK_PASS = ([2, 0, 1], [4, 1, 2])  # after slot 1 rolls back: slots out of order, one re-fed from position 3


def validate_trt_engines(engine_dir: str | Path, target, drafter=None, seed: int = 0) -> dict:
    """A TensorRT-flavour engine directory on ONNX Runtime (TrtEmulationRuntime: TensorRT's KV-cache update
    and attention emulated) against the torch reference: the target's logits and taps over ragged passes,
    a rollback, a pass with its slots out of order and one beside idle slots ("target:logits",
    "target:taps"); with a drafter, the context graph on the first half of each pass's reference taps
    (context_split), then its draft passes on the rest, greedy and sampled as build/validate.py's
    (draft_sampling: "draft:probs", draft_tokens_identical: they read the context both graphs wrote); the
    DSparkVerify tail on a pass at T > 0 with top-k/top-p (verify_identical). The torch model holds the
    GGUF blocks' exact dequantization, so int4 weights are compared at float32 tolerance too. Same
    report format as build/validate.py (its `failures` reads it)."""
    with torch.inference_mode():
        ref_rt = TorchRuntime(target, drafter, num_slots=3, max_seq_len=64)
        our_rt = TrtEmulationRuntime(engine_dir, num_slots=3, max_seq_len=64, use_drafter=drafter is not None)
        for _ in range(3):
            if ref_rt.allocate_slot() != our_rt.allocate_slot():
                raise DSparkError("the two runtimes allocated different slots")
        g = torch.Generator().manual_seed(seed)
        vocab = target.config.vocab_size
        report: dict = {}
        drafted = [0, 0]  # tokens equal to torch's, tokens drafted

        def step(slots, lens):
            slots, lens = torch.tensor(slots), torch.tensor(lens)
            ids = torch.randint(0, vocab, (int(lens.sum()),), generator=g)
            ref, ours = (rt.target_forward(ids, slots, lens, "all") for rt in (ref_rt, our_rt))
            compare(report, "target:logits", ours.logits, ref.logits, greedy=True)
            if drafter is None:
                return
            compare(report, "target:taps", ours.taps, ref.taps)
            r, b = len(slots), drafter.config.block_size
            anchors = torch.randint(0, vocab, (r,), generator=g)
            heads, tails = context_split(list(ref.taps.split(lens.tolist())))
            for rt in (ref_rt, our_rt):
                rt.extend_context(slots, heads)
            for i, sampling in enumerate(draft_sampling(r)):  # the other new features with the first pass only
                new = tails if i == 0 else [None] * r
                uniforms = torch.rand(r, b, generator=g, dtype=torch.float64)
                ref_d, our_d = (rt.draft(slots, new, anchors, *sampling, uniforms) for rt in (ref_rt, our_rt))
                compare(report, "draft:probs", our_d.full_probs(vocab), ref_d.full_probs(vocab))
                drafted[0] += int((our_d.tokens == ref_d.tokens).sum())
                drafted[1] += our_d.tokens.numel()

        for lens in VALIDATION_PASSES:
            step([0, 1, 2], lens)
        for rt in (ref_rt, our_rt):
            rt.rollback(1, 3)  # rejected rows: overwritten by the next pass
        step(*ROLLBACK_PASS)
        step([2], [3])  # slots 0 and 1 idle inside the bound range [0, 3): nothing of theirs may change
        step([0, 1], [1, 2])
        if drafter is not None:
            report["draft_tokens_identical"] = drafted[0] == drafted[1]
        validate_verify(report, vocab, ref_rt, our_rt, torch.tensor([0, 1, 2]), g, partial(compare, greedy=True))
    return report
