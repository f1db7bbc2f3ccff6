"""Measure a runtime's cost table: seconds per target pass for B verification tokens and per draft
pass for R requests, on the machine that will serve (the scheduler's SPS(B))."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dspark_trt.runtimes.base import Runtime
from dspark_trt.spec.cost_table import CostTable

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
ROW_DRAFTS = 7  # per-R rows reach R·(drafts + 1) tokens; the drafter's block size when there is one
# untimed one-token passes before the first timed one. Measured on the int4 engines (Xeon VM, stop 40): a fresh
# runtime's first one-token passes took 10.1, 9.4, 7.5 ... ms before settling at 5.3-5.9 after about ten, so
# the table's plain step, timed first, read 7.5-8.9 ms, cheaper verification looked free and the gate drafted
# where it could not pay.
WARMUP_PASSES = 20


def _median_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class ProfilePlan:
    """What a profile measures: the (R, B) target passes (SPS(B) on the diagonal R = min(B, slots), then
    each per-R row from R to R·(block + 1) tokens) and the request counts of draft passes."""

    slots: int  # requests prefilled and timed
    verify: dict[int, int]  # B -> R of the headline SPS(B) curve
    rows: dict[int, list[int]]  # R -> the B of its row
    draft_requests: list[int]

    @property
    def measurements(self) -> int:
        """Timed passes, each reported once to `progress`."""
        passes = {(r, b) for b, r in self.verify.items()} | {(r, b) for r, sizes in self.rows.items() for b in sizes}
        return len(passes) + len(self.draft_requests)


def plan_profile(runtime: Runtime, batch_sizes=DEFAULT_BATCH_SIZES, row_tokens: Sequence[int] | None = None
                 ) -> ProfilePlan:
    """What profile_runtime(runtime, batch_sizes, row_tokens=...) will time (its progress bar's length).
    row_tokens: tokens per request in the per-R rows (default every count from 1 to block + 1)."""
    n_slots = min(runtime.free_slots, max(batch_sizes))
    verify = {b: min(b, n_slots) for b in sorted(batch_sizes)}
    request_counts = sorted(set(verify.values()))
    tokens_per_request = row_tokens or range(1, (runtime.block_size or ROW_DRAFTS) + 2)
    rows = {r: sorted({r * m for m in tokens_per_request if r * m <= max(batch_sizes)} | {r}) for r in request_counts}
    return ProfilePlan(n_slots, verify, rows, request_counts if runtime.block_size else [])


def profile_runtime(runtime: Runtime, batch_sizes=DEFAULT_BATCH_SIZES, context_len: int = 256,
                    repeats: int = 5, progress: Callable[[str], None] = lambda msg: None,
                    row_tokens: Sequence[int] | None = None) -> CostTable:
    """Time target passes of B tokens spread over min(B, slots) requests with `context_len` cached
    tokens each (then rolled back), the same for each request count R with B = R..R·(block + 1) tokens
    (the table's per-R rows; R·row_tokens when given), and draft passes for R requests (plan_profile)."""
    plan = plan_profile(runtime, batch_sizes, row_tokens)
    slots = [runtime.allocate_slot() for _ in range(plan.slots)]
    try:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, runtime.vocab_size, (context_len,), generator=g)
        for slot in slots:  # prefill every slot once; passes below roll back to this length
            out = runtime.target_forward(prompt, torch.tensor([slot]), torch.tensor([context_len]), "last")
        taps_width = 0 if out.taps is None else out.taps.shape[1]
        token = torch.zeros(1, dtype=torch.long)
        for _ in range(WARMUP_PASSES):
            runtime.target_forward(token, torch.tensor(slots[:1]), torch.ones(1, dtype=torch.long), "all")
            runtime.rollback(slots[0], context_len)
        measured: dict[tuple[int, int], float] = {}

        def verify_seconds(r: int, b: int) -> float:
            """Median seconds of one pass of b tokens spread over r requests (memoised)."""
            if (r, b) not in measured:
                lens = torch.full((r,), b // r, dtype=torch.long)
                lens[: b % r] += 1
                ids = torch.randint(0, runtime.vocab_size, (b,), generator=g)
                used = torch.tensor(slots[:r])

                def target_pass():
                    runtime.target_forward(ids, used, lens, "all")
                    for slot in slots[:r]:
                        runtime.rollback(slot, context_len)

                measured[r, b] = _median_seconds(target_pass, repeats)
                progress(f"verify R={r} B={b}: {measured[r, b] * 1000:.1f} ms")
            return measured[r, b]

        verify = {b: verify_seconds(r, b) for b, r in plan.verify.items()}
        rows = {r: (sizes, [1.0 / verify_seconds(r, b) for b in sizes]) for r, sizes in plan.rows.items()}
        draft = {}
        for r in plan.draft_requests:
            used = torch.tensor(slots[:r])
            features = [torch.zeros(0, taps_width)] * r
            zeros = torch.zeros(r)

            def draft_pass():
                runtime.draft(used, features, torch.zeros(r, dtype=torch.long), zeros,
                              torch.zeros(r, dtype=torch.long), torch.ones(r),
                              torch.zeros(r, runtime.block_size, dtype=torch.float64))

            draft[r] = _median_seconds(draft_pass, repeats)
            progress(f"draft R={r}: {draft[r] * 1000:.1f} ms")
    finally:
        for slot in slots:
            runtime.free_slot(slot)
    sizes = sorted(verify)
    return CostTable(sizes, [1.0 / verify[b] for b in sizes], sorted(draft), [draft[r] for r in sorted(draft)],
                     metadata={"runtime": runtime.name, "context_len": context_len, "repeats": repeats,
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "method": "median of repeats; target pass = ragged batch of B tokens over "
                                         "min(B, slots) requests; by_requests: over R requests"},
                     by_requests=rows)
