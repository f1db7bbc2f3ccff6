"""The DSpark objective (DSPARK_SPEC.md 5.1, 6.1, 6.2): α_ce·CE + α_tv·L1 + α_conf·BCE, each a weighted
mean over supervised block slots with weight exp(-k/γ) at slot k.

A KL warm start (`kl=True`, "LK losses", arXiv 2602.23881) puts the forward KL to the target in the L1 term's
place: far from the target, over a large vocabulary, the L1 term's gradients are weak, KL's are not."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Released DSpark values; DFlash (no Markov head) is ce=1, tv=0, conf=0."""

    ce: float = 0.1
    tv: float = 0.9
    conf: float = 1.0
    decay_gamma: float = 4.0
    kl: bool = False  # forward KL(target || draft) in place of the L1 term (a warm start)


def position_weights(block_size: int, gamma: float = 4.0) -> torch.Tensor:
    """w_k = exp(-k/γ), k = 0..B-1 (the code's γ = 4, not the paper's block size; spec 6.2)."""
    return torch.tensor([math.exp(-k / gamma) for k in range(block_size)])


def dspark_loss(logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                confidence_logits: torch.Tensor | None, weights: torch.Tensor,
                loss_weights: LossWeights = LossWeights(),
                target_lse: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(total loss, diagnostics) for block slots [A, B].

    logits: the Markov-corrected draft logits ℓ [A, B, N] over the draft vocabulary; target_logits: the
    target's logits u^t [A, B, N] at the same tokens; target_lse [A, B]: logsumexp of the target's logits
    over its whole vocabulary (None: the draft vocabulary is the whole vocabulary). labels: ground-truth
    next tokens [A, B] in draft ids, -1 outside the draft vocabulary (no CE there, EAGLE-3's masking);
    weights [A, B]: position weight on supervised slots, 0 elsewhere. The L1 term is the full-vocabulary
    distance: the target's mass outside the draft vocabulary counts, where the draft has none. The
    confidence label c* = 1 - TV(softmax ℓ, target) is detached.
    """
    w = weights.float()
    denom = w.sum().clamp(min=1e-12)
    draft_logp = F.log_softmax(logits.float(), dim=-1)
    if target_lse is None:
        target_lse = torch.logsumexp(target_logits.float(), dim=-1)
    target_p = torch.exp(target_logits.float() - target_lse.float().unsqueeze(-1))
    outside = (1 - target_p.sum(-1)).clamp(min=0)
    inside = labels >= 0
    ce = F.nll_loss(draft_logp.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none").view_as(w) * inside
    l1 = (draft_logp.exp() - target_p).abs().sum(-1) + outside
    accept = (1 - 0.5 * l1.detach()).clamp(0, 1)  # c*_k, the analytic acceptance probability
    loss_ce, loss_tv = (w * ce).sum() / denom, (w * l1).sum() / denom
    stats = {"ce": loss_ce.item(), "tv": loss_tv.item(), "positions": int((w > 0).sum())}
    if loss_weights.kl:  # Σ t log(t / p) over the draft vocabulary (the mass outside it has no draft to move)
        kl = (target_p * (torch.log(target_p.clamp(min=1e-30)) - draft_logp)).sum(-1)
        loss_kl = (w * kl).sum() / denom
        stats["kl"] = loss_kl.item()
        total = loss_weights.ce * loss_ce + loss_weights.tv * loss_kl
    else:
        total = loss_weights.ce * loss_ce + loss_weights.tv * loss_tv
    if confidence_logits is not None and loss_weights.conf > 0:
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), accept, reduction="none")
        loss_conf = (w * bce).sum() / denom
        total = total + loss_weights.conf * loss_conf
        stats["conf"] = loss_conf.item()
    supervised = w > 0
    blocks = supervised[:, 0]
    # expected accepted length under teacher forcing: 1 + Σ_k Π_{i≤k} c*_i (spec 5.4)
    survival = torch.cumprod(torch.where(supervised, accept, torch.zeros_like(accept)), dim=1)
    stats["tau_probabilistic"] = float((1 + survival[blocks].sum(1)).mean()) if bool(blocks.any()) else 0.0
    stats["loss"] = total.item()
    return total, stats
