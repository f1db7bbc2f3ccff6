"""Evaluation statistics of a drafter from the engine's per-round records (DSPARK_SPEC §4.5, §5.3).

`rounds_from_requests` turns finished requests into round records in the reference evaluator's
terms (an accepted stop token ends the round: accepted = proposal = its position + 1, no bonus);
`eval_stats` computes everything `dspark-trt eval` reports for a set of rounds: τ, acceptance rate,
the accepted-length histogram, per-position conditional acceptance (the paper's Fig. 2) with the
counts behind it, and calibration of the confidence head before/after STS with pooled reliability bins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dspark_trt.spec.metrics import ECE_BINS, PRED_CLAMP, calibration_metrics, prefix_labels, prefix_predictions, summarize


@dataclass
class Rounds:
    """Per-round records: accepted drafts, drafts proposed (verified), EOS-terminated, raw confidence logits."""

    accepted: torch.Tensor  # [N] long
    proposal_len: torch.Tensor  # [N] long
    eos_terminated: torch.Tensor  # [N] bool
    confidence_logits: torch.Tensor | None  # [N, γ] or None (drafter without a confidence head)

    def __len__(self) -> int:
        return self.accepted.numel()

    @staticmethod
    def cat(parts: list["Rounds"]) -> "Rounds":
        logits = [p.confidence_logits for p in parts]
        return Rounds(torch.cat([p.accepted for p in parts]), torch.cat([p.proposal_len for p in parts]),
                      torch.cat([p.eos_terminated for p in parts]),
                      None if any(x is None for x in logits) else torch.cat(logits))


def rounds_from_requests(requests, gamma: int) -> Rounds:
    """Round records of finished requests (engine run with record_rounds on for confidences).

    RequestStats keeps per round ℓ (drafts verified), the accepted drafts and τ (committed tokens,
    cut after a stop id). τ ≤ accepted means an accepted draft was a stop token: the round ends there.
    """
    accepted, proposal, eos, logits = [], [], [], []
    for request in requests:
        s = request.stats
        for ell, acc, tau in zip(s.round_verified, s.round_accepted, s.accepted_lengths):
            terminated = tau <= acc
            accepted.append(tau if terminated else acc)
            proposal.append(tau if terminated else ell)
            eos.append(terminated)
        logits.extend(s.round_confidence_logits)
    has_logits = len(logits) == len(accepted) and len(accepted) > 0
    return Rounds(torch.tensor(accepted, dtype=torch.long), torch.tensor(proposal, dtype=torch.long),
                  torch.tensor(eos, dtype=torch.bool),
                  torch.tensor(logits, dtype=torch.float64).reshape(-1, gamma) if has_logits else None)


def reliability_bins(pred: torch.Tensor, label: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins of predicted probability: count, mean prediction, observed frequency (None if empty)."""
    p = pred.double().clamp(PRED_CLAMP, 1 - PRED_CLAMP)
    idx = (p * bins).floor().long().clamp(max=bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    sum_p = torch.bincount(idx, weights=p, minlength=bins)
    sum_y = torch.bincount(idx, weights=label.double(), minlength=bins)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "count": int(count[b]),
             "pred_mean": float(sum_p[b] / count[b]) if count[b] else None,
             "observed": float(sum_y[b] / count[b]) if count[b] else None} for b in range(bins)]


def _calibration(rounds: Rounds, gamma: int, temperatures: torch.Tensor | None) -> dict:
    """Per-position metrics of prefix-survival predictions, plus pooled reliability bins over positions."""
    metrics = calibration_metrics(rounds.confidence_logits, rounds.accepted, rounds.proposal_len, temperatures)
    label, valid = prefix_labels(rounds.accepted, rounds.proposal_len, gamma)
    pred = prefix_predictions(rounds.confidence_logits, temperatures)
    metrics["reliability"] = reliability_bins(pred[valid], label[valid])
    return metrics


def eval_stats(rounds: Rounds, gamma: int, temperatures: torch.Tensor | None = None) -> dict:
    """All eval numbers of a set of rounds (γ = the drafter's block size).

    Keys: rounds, tau (= accept_len, bonus included), acceptance_rate (the paper's: Σ τ / Σ(ℓ + 1)),
    mean_proposal_len, accepted_histogram[j] = rounds with j accepted drafts (j = 0..γ),
    position_reached[k] / position_accepted[k] = rounds that verified draft k with drafts < k accepted /
    that also accepted it, conditional_acceptance[k] = their ratio (None where no round reached k),
    prefix_survival[k], and calibration {"before", "after"} (after = None without temperatures;
    calibration = None without confidence logits).
    """
    summary = summarize(rounds.accepted, rounds.proposal_len, rounds.eos_terminated, gamma=gamma)
    k = torch.arange(gamma)
    acc, prop = rounds.accepted.unsqueeze(1), rounds.proposal_len.unsqueeze(1)
    reached = (acc >= k) & (prop > k)
    passed = reached & (acc > k)
    out = {
        "rounds": len(rounds),
        "tau": summary["accept_len"],
        "acceptance_rate": summary["verify_rate"],
        "mean_proposal_len": summary["mean_proposal_len"],
        "accepted_histogram": torch.bincount(rounds.accepted, minlength=gamma + 1).tolist(),
        "position_reached": reached.sum(0).tolist(),
        "position_accepted": passed.sum(0).tolist(),
        "conditional_acceptance": summary["conditional_acceptance"],
        "prefix_survival": summary["prefix_survival"],
        "calibration": None,
    }
    if rounds.confidence_logits is not None and len(rounds):
        out["calibration"] = {
            "before": _calibration(rounds, gamma, None),
            "after": _calibration(rounds, gamma, temperatures) if temperatures is not None else None,
        }
    return out


def json_safe(value):
    """NaN/inf → None throughout nested dicts/lists, so the result is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
