"""Draft pass cost of several engine directories, interleaved in one process (A, B, A, B, ...), so a busy
neighbour on a shared machine slows all of them alike; the minimum over rounds is reported.

Each engine's drafter holds a context of random tokens through its target (256 by default); a draft pass is
greedy with no new features (the profile's "empty backlog" pass). The one-token target step of the same engine
gives the ratio the scheduler sees: what a draft costs against what it can save.
"""
from __future__ import annotations

import time

import torch

from dspark_trt.bench.common import environment
from dspark_trt.errors import DSparkError

def _prepared(engines: str, max_requests: int, context: int):
    from dspark_trt.runtimes.ort_runtime import OrtRuntime

    runtime = OrtRuntime(engines, num_slots=max_requests, max_seq_len=2 * context)
    if runtime.drafter is None:
        raise DSparkError(f"{engines} has no drafter to time")
    slots = torch.tensor([runtime.allocate_slot() for _ in range(max_requests)])
    ids = torch.randint(0, runtime.vocab_size, (max_requests * context,), generator=torch.Generator().manual_seed(0))
    out = runtime.target_forward(ids, slots, torch.full((max_requests,), context), "last")
    features = list(out.taps.view(max_requests, context, -1))
    _draft(runtime, slots, features)
    return runtime, slots


def _draft(runtime, slots: torch.Tensor, features) -> None:
    r = len(slots)
    runtime.draft(slots, features, torch.zeros(r, dtype=torch.long), torch.zeros(r), torch.zeros(r, dtype=torch.long),
                  torch.ones(r), torch.zeros(r, runtime.block_size, dtype=torch.float64))


def _target_step(runtime, slot: torch.Tensor) -> None:
    """One token appended and taken back (the cache length restored), so every round sees the same context."""
    runtime.target_forward(torch.tensor([5]), slot, torch.tensor([1]), "last")
    runtime.cache.lengths[int(slot[0])] -= 1


def bench_draft(engines: list[str], requests=(1, 4, 16), rounds: int = 15, context: int = 256,
                progress=lambda message: None) -> dict:
    prepared = {name: _prepared(name, max(requests), context) for name in engines}
    best: dict[str, dict[str, float]] = {name: {} for name in engines}
    for i in range(rounds):
        progress(f"round {i + 1}/{rounds}")
        for name, (runtime, slots) in prepared.items():
            timings = {f"draft R={r}": lambda r=r: _draft(runtime, slots[:r], [None] * r) for r in requests}
            timings["target B=1"] = lambda: _target_step(runtime, slots[:1])
            for key, call in timings.items():
                started = time.perf_counter()
                call()
                best[name][key] = min(best[name].get(key, float("inf")), (time.perf_counter() - started) * 1000)
    for name, (runtime, _) in prepared.items():
        best[name]["draft_vocab_size"] = runtime.manifest["draft"].get("draft_vocab_size",
                                                                        runtime.config.vocab_size)
        best[name]["draft / target at R=1"] = best[name][f"draft R={requests[0]}"] / best[name]["target B=1"]
    return {"engines": best, "requests": list(requests), "rounds": rounds, "context": context,
            "method": "minimum over interleaved rounds, milliseconds", "environment": environment()}


def draft_table(result: dict) -> str:
    keys = [f"draft R={r}" for r in result["requests"]] + ["target B=1"]
    lines = ["| engines | draft vocabulary | " + " | ".join(f"{k} (ms)" for k in keys) + " | draft / target |",
             "|---" * (len(keys) + 3) + "|"]
    for name, row in result["engines"].items():
        lines.append(f"| {name} | {row['draft_vocab_size']} | " + " | ".join(f"{row[k]:.1f}" for k in keys)
                     + f" | {row['draft / target at R=1']:.2f} |")
    return "\n".join(lines)
