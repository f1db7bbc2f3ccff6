"""SPS(B): measured target steps per second at a verification batch of B tokens.

The prefix scheduler trades expected accepted tokens against the slowdown of a bigger target pass,
so it needs the real shape of the runtime's cost curve, measured on the machine that serves
(`dspark-trt profile`). A measured curve is noisy; the scheduler assumes more tokens per pass are
never faster, so the table is made non-increasing whenever it is built, by isotonic regression (a running
minimum would carry one slow measurement at a small batch into every larger one).
Optionally it also records the drafter's seconds per step for a number of requests, which the
scheduler uses to judge whether speculating pays at all (`min_predicted_gain`).

SPS(B) alone assumes a pass costs the same for B tokens however they are split over requests, which holds
where compute scales with tokens (a GPU). On a CPU each request in the pass costs on its own (its cache,
its attention): one request verifying 8 tokens took about half the time of 8 requests with one token each
on our ONNX Runtime engines. So a profile also records one SPS(B) row per number of requests R in the pass
(`by_requests`), and the schedulers, which always know R, read SPS_R(B); between profiled R the rows are
interpolated. A table without rows (older profiles, synthetic tables) is read as SPS(B) for every R.
"""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dspark_trt.errors import DSparkError

PROFILE_HINT = "run `dspark-trt profile` to measure it"


@dataclass
class CostTable:
    """Target steps/second per verification batch size, plus optional draft seconds per request count."""

    batch_sizes: list[int]
    steps_per_second: list[float]
    draft_requests: list[int] = field(default_factory=list)
    draft_seconds: list[float] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    by_requests: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # R -> (B, SPS_R(B))

    def __post_init__(self) -> None:
        self.batch_sizes, self.steps_per_second = _checked_curve(
            self.batch_sizes, self.steps_per_second, "batch_sizes", "steps_per_second")
        # more tokens per target pass is never faster, more drafting requests never cheaper
        self.steps_per_second = non_increasing(self.steps_per_second)
        if self.draft_requests or self.draft_seconds:
            self.draft_requests, self.draft_seconds = _checked_curve(
                self.draft_requests, self.draft_seconds, "draft_requests", "draft_seconds", allow_zero=True)
            self.draft_seconds = [-x for x in non_increasing([-x for x in self.draft_seconds])]
        rows = {}
        for r, (sizes, sps) in self.by_requests.items():
            if not isinstance(r, (int, np.integer)) or r < 1:
                raise ValueError(f"by_requests keys must be request counts >= 1, got {r!r}")
            sizes, sps = _checked_curve(sizes, sps, f"by_requests[{r}].batch_sizes",
                                        f"by_requests[{r}].steps_per_second")
            if sizes[0] < r:
                raise ValueError(f"by_requests[{r}]: a pass of {r} requests carries at least {r} tokens, "
                                 f"got batch size {sizes[0]}")
            rows[int(r)] = (sizes, non_increasing(sps))
        self.by_requests = dict(sorted(rows.items()))

    def sps(self, batch: int | float | np.ndarray, n_requests: int | None = None) -> float | np.ndarray:
        """SPS at batch size(s) B >= 1 for a pass of n_requests requests (None: any), linear between
        measured points, clamped beyond them."""
        b = np.asarray(batch, dtype=np.float64)
        if np.any(b < 1):
            raise ValueError(f"verification batch size must be >= 1, got {batch}")
        if n_requests is None or not self.by_requests:
            out = np.interp(b, self.batch_sizes, self.steps_per_second)
        else:
            out = self._row_sps(b, n_requests)
        return float(out) if out.ndim == 0 else out

    def _row_sps(self, b: np.ndarray, n_requests: int) -> np.ndarray:
        """SPS_R(B) between the two profiled request counts around R (clamped to the profiled range)."""
        counts = list(self.by_requests)
        r = min(max(n_requests, counts[0]), counts[-1])
        upper = next(c for c in counts if c >= r)
        lower = max(c for c in counts if c <= r)
        at = {c: np.interp(b, *self.by_requests[c]) for c in {lower, upper}}
        if lower == upper:
            return at[lower]
        w = (r - lower) / (upper - lower)
        return (1 - w) * at[lower] + w * at[upper]

    def draft_step_seconds(self, n_requests: int) -> float:
        """Seconds of one draft step for n_requests (0 when the table has no draft costs)."""
        if not self.draft_requests:
            return 0.0
        return float(np.interp(n_requests, self.draft_requests, self.draft_seconds))

    def speculation_speedup(self, verified: int, committed: float, n_requests: int = 1) -> float:
        """What rounds that verify `verified` tokens per request and commit `committed` of them gain over plain
        decoding on these costs: `committed` plain steps (one token per request each) against one draft step plus
        one verification pass."""
        plain = 1.0 / float(self.sps(n_requests, n_requests))
        verify = 1.0 / float(self.sps(verified * n_requests, n_requests))
        return committed * plain / (self.draft_step_seconds(n_requests) + verify)

    def perfect_drafter_ceiling(self, block_size: int, n_requests: int = 1) -> tuple[int, float]:
        """(tokens verified per request, speedup) of the best round for a drafter whose every draft is accepted
        (it commits all it verifies, at most block_size drafts + 1): the most any drafter gains on these costs."""
        return max(((v, self.speculation_speedup(v, v, n_requests)) for v in range(2, block_size + 2)),
                   key=lambda best: best[1])

    @classmethod
    def synthetic(cls, base_sps: float = 100.0, flat_until: int = 16, slope: float = 0.02,
                  max_batch: int = 512) -> "CostTable":
        """A made-up curve for tests only: flat up to `flat_until` tokens, then SPS ∝ 1/(1+slope·excess)."""
        sizes = sorted({1, flat_until, *range(flat_until, max_batch + 1, max(1, flat_until))})
        sps = [base_sps / (1.0 + slope * max(0, b - flat_until)) for b in sizes]
        return cls(sizes, sps, metadata={"method": "synthetic (tests only, not a measurement)"})

    def to_json(self, path: str | Path) -> None:
        meta = {
            "machine": platform.node(),
            "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **self.metadata,
        }
        data = {"batch_sizes": self.batch_sizes, "steps_per_second": self.steps_per_second,
                "draft_requests": self.draft_requests, "draft_seconds": self.draft_seconds,
                "by_requests": [{"requests": r, "batch_sizes": sizes, "steps_per_second": sps}
                                for r, (sizes, sps) in self.by_requests.items()],
                "metadata": meta}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "CostTable":
        path = Path(path)
        if not path.is_file():
            raise DSparkError(f"cost table {path} does not exist; {PROFILE_HINT}")
        try:
            data = json.loads(path.read_text())
            rows = {row["requests"]: (row["batch_sizes"], row["steps_per_second"])
                    for row in data.get("by_requests", [])}
            return cls(data["batch_sizes"], data["steps_per_second"], data.get("draft_requests", []),
                       data.get("draft_seconds", []), data.get("metadata", {}), rows)
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:  # any shape but the table's
            raise DSparkError(f"cost table {path} is malformed ({type(exc).__name__}: {exc}); {PROFILE_HINT}") from exc


def non_increasing(values) -> list[float]:
    """The least-squares non-increasing fit of a measured curve (pool adjacent violators): a run of points
    that goes up is replaced by its mean."""
    blocks: list[list[float]] = []  # [mean, count] of pooled runs
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    return [m for m, n in blocks for _ in range(n)]


def _checked_curve(xs, ys, x_name: str, y_name: str, allow_zero: bool = False) -> tuple[list[int], list[float]]:
    """Validate and sort one measured curve; raise ValueError naming the field that is wrong."""
    if not isinstance(xs, (list, tuple, np.ndarray)) or not isinstance(ys, (list, tuple, np.ndarray)):
        raise ValueError(f"{x_name} and {y_name} must be lists")
    if len(xs) == 0 or len(xs) != len(ys):
        raise ValueError(f"{x_name} and {y_name} must be non-empty and of equal length ({len(xs)} vs {len(ys)})")
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if np.any(x != np.round(x)) or np.any(x < 1) or len(np.unique(x)) != len(x):
        raise ValueError(f"{x_name} must be distinct integers >= 1, got {list(xs)}")
    if not np.all(np.isfinite(y)) or np.any(y < 0) or (not allow_zero and np.any(y == 0)):
        raise ValueError(f"{y_name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {list(ys)}")
    order = np.argsort(x)
    return x[order].astype(int).tolist(), y[order].tolist()
