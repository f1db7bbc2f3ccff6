"""Acceptance and confidence-calibration metrics from per-round records (DSPARK_SPEC §4.5, §5.3).

A round record is (accepted drafts, proposal length, EOS-terminated, confidence logits). Everything is
micro-averaged over rounds, as in the reference evaluator, so numbers are comparable with Table 1
(τ) and Fig. 2 (conditional acceptance) and Fig. 6 (ECE/AUC of the prefix-survival prediction).
"""
from __future__ import annotations

import math

import torch

ECE_BINS = 20
AUC_BINS = 1000
PRED_CLAMP = 1e-8


def accepted_length(accepted: torch.Tensor, eos_terminated: torch.Tensor) -> float:
    """τ: mean tokens committed per round, the bonus/correction token included unless EOS ended the round."""
    tau = accepted.double() + (~eos_terminated.bool()).double()
    return float(tau.mean())


def verify_rate(accepted: torch.Tensor, proposal_len: torch.Tensor, eos_terminated: torch.Tensor) -> float:
    """The paper's acceptance rate: Σ τ / (Σ proposal_len + #rounds), both counting the bonus slot."""
    tau = accepted.double() + (~eos_terminated.bool()).double()
    return float(tau.sum() / (proposal_len.double().sum() + accepted.numel()))


def prefix_survival(accepted: torch.Tensor, proposal_len: torch.Tensor, gamma: int) -> torch.Tensor:
    """accept_rate@k of the reference code: #(acc > k) / #(proposal_len > k), k = 0..γ-1 (NaN if none)."""
    k = torch.arange(gamma)
    proposed = proposal_len.unsqueeze(1) > k
    survived = (accepted.unsqueeze(1) > k) & proposed
    return survived.sum(0).double() / proposed.sum(0).double()


def conditional_acceptance(accepted: torch.Tensor, proposal_len: torch.Tensor, gamma: int) -> torch.Tensor:
    """Fig. 2: P(draft k accepted | drafts < k accepted), over rounds that proposed draft k.

    With fixed-length proposals this is (#acc > k) / (#acc > k-1) (and #acc > 0 / #rounds for k = 0);
    counting only rounds with proposal_len > k keeps it right when the scheduler shortens proposals.
    """
    k = torch.arange(gamma)
    reached = (accepted.unsqueeze(1) >= k) & (proposal_len.unsqueeze(1) > k)
    passed = (accepted.unsqueeze(1) > k) & reached
    return passed.sum(0).double() / reached.sum(0).double()


def prefix_predictions(confidence_logits: torch.Tensor, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted prefix survival P_k = Π_{i≤k} σ(s_i / T_i) in float64 ([N, γ])."""
    logits = confidence_logits.double()
    if temperatures is not None:
        logits = logits / torch.as_tensor(temperatures, dtype=torch.float64)[: logits.shape[1]]
    return torch.sigmoid(logits).cumprod(dim=1)


def prefix_labels(accepted: torch.Tensor, proposal_len: torch.Tensor, gamma: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y [N, γ] float64: drafts 0..k all accepted, valid [N, γ]: position k was proposed)."""
    k = torch.arange(gamma)
    return (accepted.unsqueeze(1) > k).double(), proposal_len.unsqueeze(1) > k


def ece(pred: torch.Tensor, label: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Expected calibration error with equal-width bins; works on [..., N] (one ECE per leading index)."""
    p = pred.double().clamp(PRED_CLAMP, 1 - PRED_CLAMP)
    y = label.double().expand_as(p)
    idx = (p * bins).floor().long().clamp(max=bins - 1)
    shape = (*p.shape[:-1], bins)
    count = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, idx, torch.ones_like(p))
    sum_p = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, idx, p)
    sum_y = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, idx, y)
    # Σ_b (n_b/N)|mean_p - mean_y| = Σ_b |Σp - Σy| / N; empty bins contribute 0
    return (sum_p - sum_y).abs().sum(-1) / p.shape[-1]


def auc(pred: torch.Tensor, label: torch.Tensor, bins: int = AUC_BINS) -> float:
    """ROC-AUC from a fine histogram of predictions; pairs in the same bin count ½; NaN if a class is empty."""
    p = pred.double().clamp(PRED_CLAMP, 1 - PRED_CLAMP)
    y = label.bool()
    idx = (p * bins).floor().long().clamp(max=bins - 1)
    pos = torch.bincount(idx[y], minlength=bins).double()
    neg = torch.bincount(idx[~y], minlength=bins).double()
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = neg.cumsum(0) - neg
    return float(((pos * neg_below).sum() + 0.5 * (pos * neg).sum()) / (n_pos * n_neg))


def brier(pred: torch.Tensor, label: torch.Tensor) -> float:
    p = pred.double().clamp(PRED_CLAMP, 1 - PRED_CLAMP)
    return float(((p - label.double()) ** 2).mean())


def calibration_metrics(
    confidence_logits: torch.Tensor,
    accepted: torch.Tensor,
    proposal_len: torch.Tensor,
    temperatures: torch.Tensor | None = None,
) -> dict:
    """Per-position ECE/AUC/Brier of predicted prefix survival vs realised prefix acceptance (§5.3).

    Returns {"positions": [{count, ece, auc, brier, pred_mean, target_mean}, ...], "ece_mean",
    "brier_mean", "pred_mean", "target_mean" (count-weighted), "auc_mean" (count-weighted over
    positions with a finite AUC)}.
    """
    gamma = confidence_logits.shape[1]
    pred = prefix_predictions(confidence_logits, temperatures)
    label, valid = prefix_labels(accepted, proposal_len, gamma)
    positions = []
    for k in range(gamma):
        p, y = pred[valid[:, k], k], label[valid[:, k], k]
        n = p.numel()
        positions.append({
            "count": n,
            "ece": float(ece(p, y)) if n else math.nan,
            "auc": auc(p, y) if n else math.nan,
            "brier": brier(p, y) if n else math.nan,
            "pred_mean": float(p.clamp(PRED_CLAMP, 1 - PRED_CLAMP).mean()) if n else math.nan,
            "target_mean": float(y.mean()) if n else math.nan,
        })
    summary = {"positions": positions}
    for name, key in (("ece", "ece_mean"), ("brier", "brier_mean"), ("auc", "auc_mean"),
                      ("pred_mean", "pred_mean"), ("target_mean", "target_mean")):
        used = [pos for pos in positions if pos["count"] and math.isfinite(pos[name])]
        total = sum(pos["count"] for pos in used)
        summary[key] = sum(pos[name] * pos["count"] for pos in used) / total if total else math.nan
    return summary


def summarize(
    accepted: torch.Tensor,
    proposal_len: torch.Tensor,
    eos_terminated: torch.Tensor,
    confidence_logits: torch.Tensor | None = None,
    temperatures: torch.Tensor | None = None,
    gamma: int | None = None,
) -> dict:
    """All metrics of a set of rounds: τ, verify_rate, mean proposal length, per-position survival and
    conditional acceptance, and (given confidence logits) calibration."""
    if gamma is None:
        gamma = confidence_logits.shape[1] if confidence_logits is not None else int(proposal_len.max())
    out = {
        "rounds": accepted.numel(),
        "accept_len": accepted_length(accepted, eos_terminated),
        "mean_proposal_len": float(proposal_len.double().mean()),
        "verify_rate": verify_rate(accepted, proposal_len, eos_terminated),
        "prefix_survival": prefix_survival(accepted, proposal_len, gamma).tolist(),
        "conditional_acceptance": conditional_acceptance(accepted, proposal_len, gamma).tolist(),
    }
    if confidence_logits is not None:
        out["calibration"] = calibration_metrics(confidence_logits, accepted, proposal_len, temperatures)
    return out
