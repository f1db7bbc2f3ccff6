"""Verification-length schedulers: how many of each request's draft tokens the next target pass checks.

Every scheduler maps (calibrated conditional confidences c [R, γ] or None, max_lengths [R]) to verify
lengths ℓ [R] in 0..max_lengths[r]; `make_scheduler` builds any of them behind that one signature.
c[r, k] ≈ P(draft k accepted | drafts < k accepted) and depends only on drafts < k.

Losslessness rule (DSPARK_SPEC §8.3): the decision to verify draft k of a request may depend on
anything computed from its drafts < k, on other requests, and on stale information — never on draft
k itself or later. Each scheduler below says why it obeys it.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Callable

import torch

from dspark_trt.errors import DSparkError
from dspark_trt.spec.cost_table import PROFILE_HINT, CostTable

# (calibrated conditional confidences [R, γ] or None, max lengths [R]) -> verify lengths [R]
Scheduler = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]
MIN_PREDICTED_GAIN = 0.04  # TensorRT-LLM's DSparkDecodingConfig.confidence_min_predicted_gain default
SCHEDULE_MODES = ("off", "fixed", "threshold", "dspark", "async")
COST_AWARE_MODES = ("dspark", "async")  # they read a cost table and come with the draft gate


def survival(conf: torch.Tensor, max_lengths: torch.Tensor) -> torch.Tensor:
    """Prefix survival a[r, j] = Π_{i≤j} c[r, i] (float64), zero where j ≥ max_lengths[r]."""
    if conf.dim() != 2 or max_lengths.shape != (conf.shape[0],):
        raise ValueError(f"confidences must be [R, γ] and max_lengths [R], got {tuple(conf.shape)} "
                         f"and {tuple(max_lengths.shape)}")
    a = conf.double().clamp(0.0, 1.0).cumprod(dim=1)
    return torch.where(torch.arange(conf.shape[1]) < max_lengths.unsqueeze(1), a, torch.zeros_like(a))


def _ranked_candidates(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(request index, survival) of every candidate with a > 0, sorted by survival descending.

    The sort is stable over the row-major order, so within a request (whose survival never
    increases with j) position j always comes before j + 1, even on ties: admitting a prefix of this
    list gives every request a prefix of its drafts.
    """
    flat = a.reshape(-1)
    values, order = flat.sort(descending=True, stable=True)
    keep = values > 0
    return order[keep] // a.shape[1], values[keep]


def _lengths_from_admitted(requests: torch.Tensor, n_requests: int) -> torch.Tensor:
    return torch.bincount(requests, minlength=n_requests).long()


def _throughput_path(values: torch.Tensor, n_requests: int, cost_table: CostTable) -> torch.Tensor:
    """Θ_i = E_i · SPS_R(B_i) after admitting the first i ranked candidates, i = 0..N (float64 [N + 1])."""
    expected = n_requests + torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(0)])
    batch = n_requests + torch.arange(values.numel() + 1)
    return expected * torch.from_numpy(cost_table.sps(batch.numpy().astype(float), n_requests))


def _worth_speculating(best_expected: float, best_batch: int, n_requests: int, cost_table: CostTable,
                       min_predicted_gain: float) -> bool:
    """Does the predicted rate of verifying beat plain decoding by min_predicted_gain? The drafts exist
    by now, so their cost is sunk; whether drafting pays at all is the DraftGate's question."""
    if min_predicted_gain <= 0:
        return True
    plain = n_requests * cost_table.sps(n_requests, n_requests)
    return best_expected * cost_table.sps(best_batch, n_requests) >= (1.0 + min_predicted_gain) * plain


def schedule_dspark(conf: torch.Tensor, cost_table: CostTable, max_lengths: torch.Tensor,
                    min_predicted_gain: float = MIN_PREDICTED_GAIN) -> torch.Tensor:
    """Algorithm 1 (§8.1): admit candidates by global survival order while Θ = E·SPS(B) improves.

    Start at ℓ = 0, B = E = R, Θ = R·SPS(R); admit (r, j) in order of a[r, j] descending, B += 1,
    E += a[r, j]; stop at the first candidate that does not raise Θ. Lossless because of that early
    break: whether (r, j) is admitted depends only on candidates ranked above it (its own earlier
    drafts and other requests), never on a[r, j+1..], which depend on draft j itself.

    min_predicted_gain: verify nothing unless speculating is predicted to beat plain decoding by this
    fraction. To stay causal the check looks only at position-0 candidates (their confidence
    depends on no draft token): gating on the full schedule's Θ would make admitting draft 0 depend
    on c_1, a function of draft 0 — exactly the bias of Appendix A.
    """
    n = conf.shape[0]
    a = survival(conf, max_lengths)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if not _worth_speculating(*early_break(a[:, :1], cost_table)[1:], n, cost_table, min_predicted_gain):
        return torch.zeros(n, dtype=torch.long)
    return early_break(a, cost_table)[0]


def early_break(a: torch.Tensor, cost_table: CostTable) -> tuple[torch.Tensor, float, int]:
    """(lengths, expected tokens, batch size) of Algorithm 1 on survival a [R, γ]."""
    n = a.shape[0]
    requests, values = _ranked_candidates(a)
    theta = _throughput_path(values, n, cost_table)
    improves = theta[1:] > theta[:-1]
    admitted = int(improves.long().cumprod(0).sum())  # length of the leading run of improvements
    expected = n + float(values[:admitted].sum())
    return _lengths_from_admitted(requests[:admitted], n), expected, n + admitted


class AsyncTopKScheduler:
    """Asynchronous top-K scheduler of the production system (§8.2).

    Each call (one engine step) ranks the fresh candidates by survival and admits the top K, where
    the capacity K (total draft tokens verified) was decided `delay` = 2 steps earlier by an
    unconstrained global search of argmax_k (R + Σ top-k a)·SPS(R + k) over that step's
    confidences — no early break, so jagged cost curves do not trap it, and the next steps' batch
    sizes are known in advance (CUDA-graph replay, zero-overhead scheduling).

    Why lossless (the causal barrier): K is a function of drafts from earlier steps only, which the
    current drafts cannot influence; given K, draft j of request r is admitted iff fewer than K
    candidates rank above (r, j), and those are its own drafts < j (the sort keeps prefix order) and
    other requests' drafts — never draft j itself or its successors.
    Until `delay` steps have been seen, K = initial_capacity.
    """

    def __init__(self, cost_table: CostTable, min_predicted_gain: float = MIN_PREDICTED_GAIN, delay: int = 2,
                 initial_capacity: int = 0):
        if delay < 1:
            raise ValueError(f"delay must be >= 1 step (0 would look at the current drafts), got {delay}")
        self.cost_table = cost_table
        self.min_predicted_gain = min_predicted_gain
        self.capacities: deque[int] = deque([initial_capacity] * delay)

    def capacity(self, conf: torch.Tensor, max_lengths: torch.Tensor) -> int:
        """The best total number of draft tokens for these confidences (global search, no early break)."""
        n = conf.shape[0]
        if n == 0:
            return 0
        requests, values = _ranked_candidates(survival(conf, max_lengths))
        theta = _throughput_path(values, n, self.cost_table)
        k = int(theta.argmax())
        expected = n + float(values[:k].sum())
        return k if _worth_speculating(expected, n + k, n, self.cost_table, self.min_predicted_gain) else 0

    def __call__(self, conf: torch.Tensor, max_lengths: torch.Tensor) -> torch.Tensor:
        capacity = self.capacities.popleft()
        self.capacities.append(self.capacity(conf, max_lengths))
        requests, _ = _ranked_candidates(survival(conf, max_lengths))
        return _lengths_from_admitted(requests[:capacity], conf.shape[0])


def schedule_threshold(conf: torch.Tensor, threshold: float, max_lengths: torch.Tensor) -> torch.Tensor:
    """ℓ = index of the first position whose conditional confidence is below threshold (§4.6), capped.

    Lossless: stopping before draft k looks only at c[0..k], which depend on drafts < k.
    """
    below = conf < threshold
    first_below = torch.where(below.any(dim=1), below.long().argmax(dim=1), torch.full_like(max_lengths, conf.shape[1]))
    return torch.minimum(first_below, max_lengths).long()


def schedule_fixed(gamma: int, max_lengths: torch.Tensor) -> torch.Tensor:
    """Verify γ drafts per request (fewer where max_lengths says so)."""
    return max_lengths.clamp(max=gamma).long()


def schedule_off(max_lengths: torch.Tensor) -> torch.Tensor:
    """Verify the anchor only: plain autoregressive decoding."""
    return torch.zeros_like(max_lengths, dtype=torch.long)


def make_scheduler(
    mode: str,
    block_size: int,
    gamma: int | None = None,
    threshold: float = 0.5,
    cost_table: CostTable | str | Path | None = None,
    has_confidence: bool = True,
    min_predicted_gain: float = MIN_PREDICTED_GAIN,
    draft_gate: bool = True,
) -> Scheduler:
    """A scheduler (conf [R, γ] | None, max_lengths [R]) -> ℓ [R] for `mode`; DSparkError on bad options.

    The cost-aware modes (dspark, async) come with a DraftGate (spec/draft_gate.py) that skips the
    draft pass of a step that cannot pay; draft_gate=False drafts every step (the paper's setting)."""
    if mode not in SCHEDULE_MODES:
        raise DSparkError(f"unknown schedule '{mode}': choose from {', '.join(SCHEDULE_MODES)}")
    if mode in ("threshold", "dspark", "async") and not has_confidence:
        raise DSparkError(f"schedule '{mode}' needs a drafter with a confidence head; use 'fixed' or 'off'")
    if mode == "off":
        return lambda conf, max_lengths: schedule_off(max_lengths)
    if mode == "fixed":
        gamma = block_size if gamma is None else gamma
        if not 0 <= gamma <= block_size:
            raise DSparkError(f"gamma must be in 0..{block_size} (the drafter's block size), got {gamma}")
        return lambda conf, max_lengths: schedule_fixed(gamma, max_lengths)
    if mode == "threshold":
        if not 0.0 <= threshold <= 1.0:
            raise DSparkError(f"threshold must be in [0, 1], got {threshold}")
        return lambda conf, max_lengths: schedule_threshold(conf, threshold, max_lengths)
    if min_predicted_gain < 0:
        raise DSparkError(f"min_predicted_gain must be >= 0, got {min_predicted_gain}")
    if cost_table is None:
        raise DSparkError(f"schedule '{mode}' needs a cost table (--cost-table PATH); {PROFILE_HINT}")
    from dspark_trt.spec.draft_gate import DraftGate, GatedScheduler

    table = cost_table if isinstance(cost_table, CostTable) else CostTable.from_json(cost_table)
    if mode == "async":
        rule: Scheduler = AsyncTopKScheduler(table, min_predicted_gain)
    else:
        def rule(conf: torch.Tensor, max_lengths: torch.Tensor) -> torch.Tensor:
            return schedule_dspark(conf, table, max_lengths, min_predicted_gain)
    return GatedScheduler(rule, DraftGate(table, min_predicted_gain)) if draft_gate else rule
