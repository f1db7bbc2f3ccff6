"""How far an engine's target strays from the float32 torch reference on real prompts.

For each prompt the reference decodes greedily; the engine is then fed the same tokens (teacher
forcing) and its next-token distributions are compared position by position (KL(reference || engine),
argmax agreement), and it decodes greedily on its own: the first position where its tokens leave the
reference's is its greedy divergence (None: identical over the whole budget).
"""
from __future__ import annotations

import numpy as np
import torch

from dspark_trt.bench.common import environment


@torch.inference_mode()
def _greedy(runtime, prompt: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """(tokens, logits [max_tokens, V] the tokens were taken from) of a greedy decode on one slot."""
    slot = runtime.allocate_slot()
    try:
        step = runtime.target_forward(torch.tensor(prompt), torch.tensor([slot]), torch.tensor([len(prompt)]), "last")
        tokens, logits = [], []
        for _ in range(max_tokens):
            logits.append(step.logits[-1].float())
            tokens.append(int(step.logits[-1].argmax()))
            step = runtime.target_forward(torch.tensor(tokens[-1:]), torch.tensor([slot]), torch.tensor([1]), "last")
        return tokens, torch.stack(logits)
    finally:
        runtime.free_slot(slot)


@torch.inference_mode()
def _teacher_forced(runtime, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The engine's logits [len(tokens), V] for each next token of prompt + tokens, in one pass."""
    slot = runtime.allocate_slot()
    try:
        ids = prompt + tokens[:-1]
        step = runtime.target_forward(torch.tensor(ids), torch.tensor([slot]), torch.tensor([len(ids)]), "all")
        return step.logits[len(prompt) - 1:].float()
    finally:
        runtime.free_slot(slot)


def measure_precision(engines: str, target: str, prompts: list[list[int]], max_tokens: int,
                      progress=lambda message: None) -> dict:
    """Per prompt and overall: mean KL, argmax agreement (teacher-forced) and greedy divergence."""
    from dspark_trt.models.weights import load_target
    from dspark_trt.runtimes.ort_runtime import OrtRuntime
    from dspark_trt.runtimes.torch_runtime import TorchRuntime

    longest = max(len(p) for p in prompts) + max_tokens + 1
    reference = TorchRuntime(load_target(target)[0], None, num_slots=1, max_seq_len=longest)
    engine = OrtRuntime(engines, num_slots=1, max_seq_len=longest, use_drafter=False)
    rows = []
    for i, prompt in enumerate(prompts):
        progress(f"prompt {i + 1}/{len(prompts)}")
        ref_tokens, ref_logits = _greedy(reference, prompt, max_tokens)
        ours = _teacher_forced(engine, prompt, ref_tokens)
        ref_logp, our_logp = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(ours.double(), -1)
        kl = (ref_logp.exp() * (ref_logp - our_logp)).sum(-1)
        own_tokens, _ = _greedy(engine, prompt, max_tokens)
        diverged = next((j for j, (a, b) in enumerate(zip(own_tokens, ref_tokens)) if a != b), None)
        rows.append({"prompt_tokens": len(prompt), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                     "argmax_agreement": float((ours.argmax(-1) == ref_logits.argmax(-1)).double().mean()),
                     "greedy_divergence": diverged})
    divergences = [r["greedy_divergence"] for r in rows]
    return {
        "engines": str(engines), "target_weights": engine.manifest["target"].get("weights", "fp32"),
        "accuracy_level": engine.manifest["target"].get("accuracy_level"), "max_tokens": max_tokens,
        "prompts": len(prompts),
        "mean_kl": float(np.mean([r["mean_kl"] for r in rows])),
        "argmax_agreement": float(np.mean([r["argmax_agreement"] for r in rows])),
        "greedy_identical_prompts": sum(d is None for d in divergences),
        "median_greedy_divergence": float(np.median([max_tokens if d is None else d for d in divergences])),
        "per_prompt": rows, "environment": environment(),
    }


def precision_table(result: dict) -> str:
    lines = [f"{result['target_weights']} target (accuracy level {result['accuracy_level']}) vs float32 torch, "
             f"{result['prompts']} prompts x {result['max_tokens']} greedy tokens:",
             f"  mean KL {result['mean_kl']:.4f}, argmax agreement {result['argmax_agreement']:.4f} (teacher-forced)",
             f"  greedy identical on {result['greedy_identical_prompts']}/{result['prompts']} prompts, median first "
             f"divergence at token {result['median_greedy_divergence']:.0f}"]
    return "\n".join(lines)
