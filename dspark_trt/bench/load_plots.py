"""PNG plots of a `bench load` result: the throughput vs per-user speed frontier and the verification
budget vs concurrency (the quantities of the paper's Figure 8). Agg backend: no display needed."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from dspark_trt.bench.load import pareto_front  # noqa: E402


def _by_mode(points: list[dict]) -> dict[str, list[dict]]:
    modes: dict[str, list[dict]] = {}
    for point in points:
        modes.setdefault(point["mode"], []).append(point)
    return {mode: sorted(ps, key=lambda p: p["concurrency"]) for mode, ps in modes.items()}


def frontier_plot(points: list[dict], title: str, path: Path) -> None:
    """Aggregate tokens/s vs median per-user tokens/s, one line per mode (labelled by concurrency),
    with the Pareto frontier over all modes dashed."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for mode, ps in _by_mode(points).items():
        xs = [p["per_user_tokens_per_second_median"] for p in ps]
        ys = [p["aggregate_tokens_per_second"] for p in ps]
        ax.plot(xs, ys, marker="o", label=mode)
        for p, x, y in zip(ps, xs, ys):
            ax.annotate(f"C{p['concurrency']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    front = pareto_front([(p["per_user_tokens_per_second_median"], p["aggregate_tokens_per_second"]) for p in points])
    ax.plot([x for x, _ in front], [y for _, y in front], color="black", linestyle="--", linewidth=1, marker="o",
            markersize=12, fillstyle="none", label="Pareto frontier")  # circled: visible even as one point
    ax.set(xlabel="per-user tokens/s (median)", ylabel="aggregate tokens/s", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_plot(points: list[dict], title: str, path: Path) -> None:
    """Average drafts verified per request per round vs concurrency, one line per mode."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, ps in _by_mode(points).items():
        ax.plot([p["concurrency"] for p in ps], [p["mean_verify_length"] for p in ps], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="concurrent streams", ylabel="drafts verified per request per round (ℓ)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
