"""How many draft tokens each request verifies this step.

Every scheduler maps (calibrated conditional confidences c [R, γ], max lengths [R]) to verify
lengths ℓ [R]. Losslessness rule (DSPARK_SPEC.md 8.3): the decision to verify draft k may depend on
anything computed from tokens < k or on stale information, never on token k itself. Confidence c_k
depends only on tokens < k, so all schedulers below obey it.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from dspark_trt.errors import DSparkError
from dspark_trt.spec.cost_table import CostTable

SchedulerFn = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def _candidates(conf: torch.Tensor, max_lengths: torch.Tensor) -> list[tuple[float, int, int]]:
    """(survival a_{r,j}, r, j) for every admissible draft, sorted by a descending.

    j counts drafts (1-based). Ties keep prefix order within a request because a is non-increasing
    along j and the sort is stable over (r, j) order.
    """
    survival = conf.double().cumprod(dim=1)
    cands = []
    for r in range(conf.shape[0]):
        for j in range(int(max_lengths[r])):
            a = float(survival[r, j])
            if a > 0:
                cands.append((a, r, j + 1))
    cands.sort(key=lambda c: -c[0])
    return cands


def schedule_dspark(conf: torch.Tensor, cost: CostTable, max_lengths: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Algorithm 1 (hardware-aware prefix scheduler) with its early break; returns (ℓ, best Θ / base Θ).

    Start with every request verifying only its anchor (B = R, E = R); admit candidates in global
    order of survival a while the expected throughput Θ = E · SPS(B) improves; stop at the first
    candidate that does not improve it.
    """
    n = conf.shape[0]
    lengths = torch.zeros(n, dtype=torch.long)
    best_lengths = lengths.clone()
    tokens, expected = n, float(n)
    base = best = expected * cost.sps(tokens, n)
    for a, r, j in _candidates(conf, max_lengths):
        lengths[r] = j
        tokens += 1
        expected += a
        theta = expected * cost.sps(tokens, n)
        if theta <= best:
            break
        best, best_lengths = theta, lengths.clone()
    return best_lengths, best / base


def best_capacity(conf: torch.Tensor, cost: CostTable, max_lengths: torch.Tensor) -> int:
    """Unconstrained global search (no early break) for the number of drafts K maximising Θ."""
    n = conf.shape[0]
    expected, best, best_k = float(n), n * cost.sps(n, n), 0
    for k, (a, _, _) in enumerate(_candidates(conf, max_lengths), start=1):
        expected += a
        theta = expected * cost.sps(n + k, n)
        if theta > best:
            best, best_k = theta, k
    return best_k


def admit_top_k(conf: torch.Tensor, capacity: int, max_lengths: torch.Tensor) -> torch.Tensor:
    """Admit the `capacity` candidates with the highest fresh survival (prefixes stay contiguous)."""
    lengths = torch.zeros(conf.shape[0], dtype=torch.long)
    for _, r, j in _candidates(conf, max_lengths)[:capacity]:
        lengths[r] = max(int(lengths[r]), j)
    return lengths


class AsyncTopKScheduler:
    """Section 5.2's production variant: capacity from confidences two steps old, top-K admission now.

    K comes only from information two steps back, so it cannot depend on the current drafts (the
    causal barrier); admission ranks current candidates by survival, which depends only on tokens
    before each candidate. The search for K has no early break, so jagged cost curves do not trap it.
    """

    def __init__(self, cost: CostTable, delay: int = 2):
        self.cost = cost
        self.pending: deque[int] = deque([0] * delay, maxlen=delay)

    def __call__(self, conf: torch.Tensor | None, max_lengths: torch.Tensor) -> torch.Tensor:
        capacity = self.pending[0]
        self.pending.append(best_capacity(conf, self.cost, max_lengths))
        return admit_top_k(conf, capacity, max_lengths)


def schedule_threshold(conf: torch.Tensor, threshold: float, max_lengths: torch.Tensor) -> torch.Tensor:
    """ℓ = index of the first position whose conditional confidence is below the threshold (spec 4.6)."""
    below = conf < threshold
    first_below = torch.where(below.any(dim=1), below.float().argmax(dim=1), torch.full_like(max_lengths, 10**9))
    return torch.minimum(first_below.long(), max_lengths)


class DSparkScheduler:
    """Algorithm 1 plus TensorRT-LLM's `confidence_min_predicted_gain`.

    When the previous step's best Θ beat plain decoding by less than `min_predicted_gain`, this step
    verifies no drafts. Using the previous step's prediction (stale information) keeps the switch
    from depending on the current drafts.
    """

    def __init__(self, cost: CostTable, min_predicted_gain: float = 0.04):
        self.cost = cost
        self.min_predicted_gain = min_predicted_gain
        self.last_gain = float("inf")

    def __call__(self, conf: torch.Tensor | None, max_lengths: torch.Tensor) -> torch.Tensor:
        lengths, gain = schedule_dspark(conf, self.cost, max_lengths)
        speculate = self.last_gain >= 1.0 + self.min_predicted_gain
        self.last_gain = gain
        return lengths if speculate else torch.zeros_like(lengths)


def make_scheduler(mode: str, block_size: int, gamma: int | None = None, threshold: float = 0.5,
                   cost_table: str | CostTable | None = None, has_confidence: bool = True,
                   min_predicted_gain: float = 0.04) -> SchedulerFn:
    """One call signature for every mode: off | fixed | threshold | dspark | async."""
    if mode == "off":
        return lambda conf, max_lengths: torch.zeros_like(max_lengths)
    if mode == "fixed":
        gamma = block_size if gamma is None else gamma
        if not 0 <= gamma <= block_size:
            raise DSparkError(f"--gamma must be in [0, block size {block_size}], got {gamma}")
        return lambda conf, max_lengths: torch.clamp(max_lengths, max=gamma)
    if not has_confidence:
        raise DSparkError(f"schedule '{mode}' needs a drafter with a confidence head; use 'fixed' for this one")
    if mode == "threshold":
        return lambda conf, max_lengths: schedule_threshold(conf, threshold, max_lengths)
    if mode in ("dspark", "async"):
        if cost_table is None:
            raise DSparkError(f"schedule '{mode}' needs a cost table: measure one with `dspark-trt profile` "
                              f"and pass --cost-table FILE")
        cost = cost_table if isinstance(cost_table, CostTable) else CostTable.from_json(cost_table)
        return DSparkScheduler(cost, min_predicted_gain) if mode == "dspark" else AsyncTopKScheduler(cost)
    raise DSparkError(f"unknown schedule '{mode}'")
