"""PNG plots of `dspark-trt eval` results: reliability diagram and per-position conditional acceptance.

Both take the dicts produced by `spec.eval_stats.eval_stats` (after json_safe: missing values are None).
matplotlib runs on the Agg backend, so no display is needed.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend


def reliability_diagram(calibration: dict, title: str, path: Path) -> None:
    """Observed prefix survival vs predicted, pooled over positions, before (and after) STS."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
    for key, color in (("before", "tab:red"), ("after", "tab:blue")):
        metrics = calibration.get(key)
        if metrics is None:
            continue
        bins = [b for b in metrics["reliability"] if b["count"]]
        ece = metrics["ece_mean"]
        label = f"{'raw' if key == 'before' else 'STS'} (ECE {ece:.3f})" if ece is not None else key
        ax.plot([b["pred_mean"] for b in bins], [b["observed"] for b in bins], marker="o", color=color, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted prefix survival Π c_k", ylabel="observed prefix acceptance",
           title=f"reliability: {title}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def acceptance_plot(stats: dict, title: str, path: Path) -> None:
    """P(draft k accepted | drafts < k accepted) per position (paper Fig. 2), with prefix survival."""
    gamma = len(stats["conditional_acceptance"])
    positions = list(range(1, gamma + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(positions, [float("nan") if v is None else v for v in stats["conditional_acceptance"]], marker="o",
            label="conditional acceptance")
    ax.plot(positions, [float("nan") if v is None else v for v in stats["prefix_survival"]], marker="s",
            linestyle="--", label="prefix survival")
    for k, n in zip(positions, stats["position_reached"]):
        ax.annotate(f"n={n}", (k, 0.02), ha="center", fontsize=7)
    tau = stats["tau"]
    ax.set(xticks=positions, ylim=(0, 1.05), xlabel="draft position k", ylabel="acceptance",
           title=f"{title}: τ = {tau:.2f}" if tau is not None else title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
