"""Sequential Temperature Scaling (STS, DSPARK_SPEC §5.2) of the confidence head.

The scheduler multiplies conditional confidences into prefix-survival probabilities and compares
them with the cost of verifying, so it needs them calibrated in absolute terms; raw heads are
over-confident. STS gives each position k its own temperature, ĉ_k = σ(s_k / T_k) (order-preserving,
so AUC is unchanged), chosen in order k = 1..γ by a 1-D grid search that minimises the 20-bin ECE of
the cumulative product Π_{i≤k} ĉ_i against the realised prefix acceptance, with earlier temperatures
frozen: each position corrects what the product of the earlier ones still gets wrong.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark_trt.errors import DSparkError
from dspark_trt.spec.metrics import ece, prefix_labels

DEFAULT_GRID = torch.linspace(0.5, 4.0, 351, dtype=torch.float64)  # 0.50, 0.51, ..., 4.00
CALIBRATE_HINT = "run `dspark-trt calibrate` to fit it"


@dataclass
class Calibration:
    temperatures: list[float]
    ece_before: list[float] = field(default_factory=list)
    ece_after: list[float] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def apply_sts(confidence_logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Calibrated conditional confidences σ(s_k / T_k), [..., γ] (temperatures may be longer than γ)."""
    temps = torch.as_tensor(temperatures, dtype=confidence_logits.dtype)[: confidence_logits.shape[-1]]
    return torch.sigmoid(confidence_logits / temps)


def fit_sts(
    confidence_logits: torch.Tensor,
    accepted: torch.Tensor,
    proposal_len: torch.Tensor,
    grid: torch.Tensor = DEFAULT_GRID,
) -> torch.Tensor:
    """Per-position temperatures [γ] from held-out rounds.

    confidence_logits [N, γ] (raw head logits s_k); accepted [N] (accepted drafts of the round);
    proposal_len [N] (drafts proposed; position k is used only by rounds with proposal_len > k).
    Fit on rounds drafted at the serving temperature with full blocks (no pruning) for best results.
    """
    n, gamma = confidence_logits.shape
    if accepted.shape != (n,) or proposal_len.shape != (n,):
        raise ValueError(f"accepted and proposal_len must have shape [{n}], got {tuple(accepted.shape)} "
                         f"and {tuple(proposal_len.shape)}")
    logits = confidence_logits.double()
    label, valid = prefix_labels(accepted, proposal_len, gamma)
    grid = grid.double()
    temps = torch.ones(gamma, dtype=torch.float64)
    survival = torch.ones(n, dtype=torch.float64)  # Π_{i<k} ĉ_i with the temperatures chosen so far
    for k in range(gamma):
        rows = valid[:, k]
        if not bool(rows.any()):
            break  # no round reached this position: later ones are unreachable too; keep T = 1
        # candidate predictions for every grid temperature at once: [G, N_k]
        pred = survival[rows] * torch.sigmoid(logits[rows, k] / grid.unsqueeze(1))
        temps[k] = grid[int(ece(pred, label[rows, k]).argmin())]
        survival = survival * torch.sigmoid(logits[:, k] / temps[k])
    return temps


def save_calibration(calibration: Calibration, path: str | Path) -> None:
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "method": "sequential temperature scaling, 20-bin ECE of prefix survival", **calibration.metadata}
    data = {"temperatures": [float(t) for t in calibration.temperatures], "ece_before": calibration.ece_before,
            "ece_after": calibration.ece_after, "metadata": meta}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise DSparkError(f"calibration file {path} does not exist; {CALIBRATE_HINT}")
    try:
        data = json.loads(path.read_text())
        temps = [float(t) for t in data["temperatures"]]
        if not temps or not all(0 < t < float("inf") for t in temps):
            raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {data['temperatures']}")
        return Calibration(temps, data.get("ece_before", []), data.get("ece_after", []), data.get("metadata", {}))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DSparkError(f"calibration file {path} is malformed ({type(exc).__name__}: {exc}); "
                          f"{CALIBRATE_HINT}") from exc
