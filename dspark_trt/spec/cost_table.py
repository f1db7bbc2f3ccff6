"""The runtime's measured cost curve: seconds per target pass for B verification tokens, and per
draft pass for R requests. The scheduler turns it into SPS (steps/second) for Algorithm 1.

Measured by `dspark-trt profile` on the actual runtime and machine; the JSON records both.
Times are smoothed to be non-decreasing in the batch size (a measured dip is noise, and a
scheduler chasing it would oscillate), interpolated linearly between measured sizes and
extrapolated linearly beyond the largest one (so large batches never look free).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dspark_trt.errors import DSparkError


def _monotone(points: dict[int, float]) -> dict[int, float]:
    out, running = {}, 0.0
    for size in sorted(points):
        running = max(running, float(points[size]))
        out[int(size)] = running
    return out


def _interpolate(points: dict[int, float], x: float) -> float:
    sizes = sorted(points)
    if len(sizes) == 1:
        return points[sizes[0]] * max(x, 1) / sizes[0]
    if x <= sizes[0]:
        return points[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if x <= hi:
            return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)
    lo, hi = sizes[-2], sizes[-1]
    slope = max((points[hi] - points[lo]) / (hi - lo), 0.0)
    return points[hi] + slope * (x - hi)


@dataclass
class CostTable:
    verify_seconds: dict[int, float]  # tokens per target pass -> seconds
    draft_seconds: dict[int, float] = field(default_factory=dict)  # requests per draft pass -> seconds
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.verify_seconds:
            raise DSparkError("cost table has no verification timings")
        if any(s < 1 or t <= 0 for s, t in self.verify_seconds.items()):
            raise DSparkError("cost table timings must be positive, for batch sizes >= 1")
        self.verify_seconds = _monotone(self.verify_seconds)
        self.draft_seconds = _monotone(self.draft_seconds)

    def step_seconds(self, verify_tokens: int, draft_requests: int = 0) -> float:
        """Predicted seconds of one engine step (draft pass for R requests + target pass of B tokens)."""
        seconds = _interpolate(self.verify_seconds, verify_tokens)
        if draft_requests and self.draft_seconds:
            seconds += _interpolate(self.draft_seconds, draft_requests)
        return seconds

    def sps(self, verify_tokens: int, draft_requests: int = 0) -> float:
        """Steps per second SPS(B), the quantity of Algorithm 1."""
        return 1.0 / self.step_seconds(verify_tokens, draft_requests)

    def to_json(self, path: str | Path) -> None:
        data = {"verify_seconds": {str(k): v for k, v in self.verify_seconds.items()},
                "draft_seconds": {str(k): v for k, v in self.draft_seconds.items()},
                "metadata": self.metadata}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "CostTable":
        path = Path(path)
        if not path.is_file():
            raise DSparkError(f"cost table {path} not found: measure one with `dspark-trt profile --out {path}`")
        try:
            data = json.loads(path.read_text())
            return cls({int(k): float(v) for k, v in data["verify_seconds"].items()},
                       {int(k): float(v) for k, v in data.get("draft_seconds", {}).items()},
                       data.get("metadata", {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DSparkError(f"cost table {path} is malformed ({exc}); re-run `dspark-trt profile`") from exc
