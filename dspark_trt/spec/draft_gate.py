"""Whether the next decode step should run the draft pass at all (cost-aware schedules: dspark, async).

Algorithm 1 decides how many drafts to verify once they exist, when their cost is already paid. Where a
draft pass costs about as much as a target step (a CPU, or any machine near saturation) the better move
is often not to draft: at high concurrency Algorithm 1 verifies nothing, and a step that drafted for
nothing is slower than plain decoding. So before each decode step the gate compares the throughput it
predicts for drafting with plain decoding (R·SPS(R)), and drafts only when the gain clears
`min_predicted_gain`. The prediction is what the verification rule made of recent drafts: the expected
tokens (calibrated survival) of the drafts it verified, and how often it verified 0, 1, ... γ of them,
each count priced on the cost table (profiled SPS(B) and draft seconds). Not the rule applied to the
mean survival: the rule verifies much on confident rounds and nothing on the others, which is worth more
than a middling round; and not the price of the mean batch: on a jagged table (the int4 CPU engines: a
second row costs 38% more than one, the third and fourth about nothing) the mean of the prices is not
the price of the mean. Replayed on recorded rounds priced on a cost table (scripts/replay_gate.py), those
two made the gate skip most math steps where drafting every step gained 16% (docs/benchmarks.md, "Stop 40";
on the engines themselves drafting did not pay there, and the gate gained nothing either way).

Both predicted step times are corrected by how long such steps really took here (an EWMA of measured /
predicted seconds per number of requests in the step), so a cost table profiled under other conditions, or
engine overhead it does not see, cannot keep the gate wrong. Per number of requests, because that overhead is
a different share of a step at another count: served at 16 concurrent streams, plain steps last timed while 3
requests ran (1.31x the table) made drafting look cheaper than plain decoding at 16 (1.18x): the gate drafted
and ran 12-22% below plain decoding. A count where only one kind of step was timed uses that kind's scale for
both, so the table alone compares them until the other kind is timed there (and the other's scale is where its
own starts from). The expected tokens are
corrected the same way, by the drafts really accepted over those the calibrated survival predicted for
what was verified, so confidences that run high (calibrated on other prompts) cannot keep it drafting.
While it declines, it probes after skipping 1, 2, 4, ... `max_backoff` steps: the engine drafts for one
request (the one longest without a draft), which refreshes the estimate for the cost of a one-request
draft, so new requests or a change in their confidences are noticed cheaply at any concurrency.

Lossless: the decision rests on earlier steps only, and a step that does not draft is plain decoding
from the target. The drafter's context stays complete for the next draft: the engine keeps skipped steps'
target features as a backlog, which that draft carries, or a context extension (Runtime.extend_context)
once it reaches the engine's context_backlog (four blocks' rows by default).
"""
from __future__ import annotations

import numpy as np
import torch

from dspark_trt.spec.cost_table import CostTable
from dspark_trt.spec.scheduler import MIN_PREDICTED_GAIN, Scheduler, survival

SMOOTHING = 0.2  # EWMA weight of the newest observation
MAX_BACKOFF = 64  # the longest run of steps without drafting before the gate looks again


class DraftGate:
    """Predicts before a step whether drafting pays; `observe_*` feed it what each step did and cost."""

    def __init__(self, cost_table: CostTable, min_predicted_gain: float = MIN_PREDICTED_GAIN,
                 max_backoff: int = MAX_BACKOFF, smoothing: float = SMOOTHING):
        if max_backoff < 1:
            raise ValueError(f"max_backoff must be >= 1, got {max_backoff}")
        self.cost_table = cost_table
        self.min_predicted_gain = min_predicted_gain
        self.max_backoff = max_backoff
        self.smoothing = smoothing
        # EWMAs over drafting requests of what the rule made of their drafts: expected tokens (1 + calibrated
        # survival of the drafts verified), and the share of them that verified 0, 1, ... γ drafts [γ + 1]; a step
        # where k requests drafted counts as k rounds, so one probe's request cannot outweigh a whole batch's
        self.expected_tokens: float | None = None
        self.verified_share: torch.Tensor | None = None
        # EWMA of measured / predicted step seconds, per kind of step and number of requests in it
        self.time_scale: dict[str, dict[int, float]] = {"draft": {}, "plain": {}}
        self._accepted: float | None = None  # EWMA of the drafts accepted per drafted step that verified
        self._predicted: float | None = None  # EWMA of the accepted drafts survival predicted for those steps
        self._prices: dict[tuple[int, int], tuple[float, float]] = {}  # _step_prices, until the next draft
        self._plain_prices: dict[int, float] = {}
        self._backoff = 1
        self._declined = 0
        self.decisions = {"draft": 0, "probe": 0, "skip": 0}

    def plan(self, max_lengths: torch.Tensor) -> str:
        """This step: "draft" (every request drafts), "probe" (one does) or "skip" (none does).
        max_lengths [R]: the most drafts each decoding request may verify."""
        if self.expected_tokens is None:  # nothing known yet: learn from one request's draft
            return self._decide("probe")
        if self.predicted_gain(max_lengths) >= self.min_predicted_gain:
            self._backoff, self._declined = 1, 0
            return self._decide("draft")
        self._declined += 1
        if self._declined > self._backoff:  # probe, so the prediction rests on fresh confidences
            self._declined, self._backoff = 0, min(2 * self._backoff, self.max_backoff)
            return self._decide("probe")
        return self._decide("skip")

    def predicted_gain(self, max_lengths: torch.Tensor) -> float:
        """Predicted throughput of drafting over plain decoding, minus 1, for these requests."""
        n, room = max_lengths.shape[0], int((max_lengths > 0).sum())  # only requests with room verify drafts
        expected = n + self.token_scale * room * (self.expected_tokens - 1.0)
        draft_seconds, plain_seconds = self._step_prices(n, room)
        return (expected / (self.scale("draft", n) * draft_seconds) / (n / (self.scale("plain", n) * plain_seconds))
                - 1.0)

    def scale(self, kind: str, n_requests: int) -> float:
        """Measured / predicted seconds of `kind` steps ("draft", "plain") of n_requests; the other kind's where
        only it was timed at that count, 1 where neither was."""
        other = self.time_scale["plain" if kind == "draft" else "draft"]
        return self.time_scale[kind].get(n_requests, other.get(n_requests, 1.0))

    def _step_prices(self, n: int, room: int) -> tuple[float, float]:
        """The cost table's seconds of a drafted step (over the rule's recent outcomes, each priced) and of a
        plain step, for n requests of which `room` may verify drafts. Kept until a draft changes the outcomes:
        a gate that declines asks every step, and the table's interpolations were most of its cost."""
        key = (n, room)
        if key not in self._prices:
            share = self.verified_share.numpy()
            counts = np.arange(share.shape[0], dtype=np.float64)
            others = max(room - 1, 0) * float(share @ counts)  # the other requests' drafts, at their mean
            batches = n + others + counts * (room > 0)
            self._prices[key] = (float(share @ self._profiled_draft_seconds(n, batches, drafting=n)),
                                 self._profiled_plain_seconds(n))
        return self._prices[key]

    @property
    def token_scale(self) -> float:
        """Drafts really accepted / drafts the calibrated survival predicted (1 until something was verified)."""
        return self._accepted / self._predicted if self._predicted else 1.0

    def observe_draft(self, calibrated_conf: torch.Tensor, n_requests: int, lengths: torch.Tensor,
                      accepted: torch.Tensor, seconds: float) -> None:
        """A drafted step: the calibrated confidences [k, γ] of the k requests that drafted, the requests
        in its target pass, the drafts verified [k] and accepted [k] for each drafter, its seconds."""
        k, gamma = calibrated_conf.shape
        predicted_accepted = float(survival(calibrated_conf, lengths).sum())
        expected = 1.0 + predicted_accepted / k
        share = torch.bincount(lengths.long(), minlength=gamma + 1).double() / k
        first = self.expected_tokens is None
        weight = 1.0 - (1.0 - self.smoothing) ** k  # k requests' rounds, each weighed as a probe's one
        self.expected_tokens = expected if first else self._blend(self.expected_tokens, expected, weight)
        self.verified_share = share if first else self._blend(self.verified_share, share, weight)
        self._prices.clear()
        if predicted_accepted > 0:
            got = float(accepted.sum())
            first = self._predicted is None
            self._accepted = got if first else self._blend(self._accepted, got)
            self._predicted = predicted_accepted if first else self._blend(self._predicted, predicted_accepted)
        batch = n_requests + int(lengths.sum())
        self._rescale("draft", n_requests, seconds / self._profiled_draft_seconds(n_requests, batch, drafting=k))

    def observe_plain(self, n_requests: int, seconds: float) -> None:
        self._rescale("plain", n_requests, seconds / self._profiled_plain_seconds(n_requests))

    def _profiled_draft_seconds(self, n_requests: int, batch: float | np.ndarray,
                                drafting: int) -> float | np.ndarray:
        """The cost table's seconds for a pass of `batch` tokens over n_requests after `drafting` drafted."""
        return 1.0 / self.cost_table.sps(batch, n_requests) + self.cost_table.draft_step_seconds(drafting)

    def _profiled_plain_seconds(self, n_requests: int) -> float:
        if n_requests not in self._plain_prices:  # the table does not change: asked every plain step
            self._plain_prices[n_requests] = 1.0 / float(self.cost_table.sps(n_requests, n_requests))
        return self._plain_prices[n_requests]

    def _rescale(self, kind: str, n_requests: int, ratio: float) -> None:
        self.time_scale[kind][n_requests] = self._blend(self.scale(kind, n_requests), ratio)

    def _blend(self, old, new, weight: float | None = None):
        weight = self.smoothing if weight is None else weight
        return (1 - weight) * old + weight * new

    def _decide(self, plan: str) -> str:
        self.decisions[plan] += 1
        return plan


class GatedScheduler:
    """A cost-aware verification rule (dspark, async) with the gate that decides whether to draft."""

    def __init__(self, rule: Scheduler, gate: DraftGate):
        self.rule = rule
        self.gate = gate

    def __call__(self, conf: torch.Tensor | None, max_lengths: torch.Tensor) -> torch.Tensor:
        return self.rule(conf, max_lengths)
