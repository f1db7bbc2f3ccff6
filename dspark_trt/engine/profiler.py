"""Measure a runtime's cost table: seconds per target pass for B verification tokens and per draft
pass for R requests, on the machine that will serve (the scheduler's SPS(B))."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from dspark_trt.runtimes.base import Runtime
from dspark_trt.spec.cost_table import CostTable

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
ROW_DRAFTS = 7  # per-R rows reach R·(drafts + 1) tokens; the drafter's block size when there is one


def _median_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_runtime(runtime: Runtime, batch_sizes=DEFAULT_BATCH_SIZES, context_len: int = 256,
                    repeats: int = 5, progress: Callable[[str], None] = lambda msg: None) -> CostTable:
    """Time target passes of B tokens spread over min(B, slots) requests with `context_len` cached
    tokens each (then rolled back), the same for each request count R with B = R..R·(block + 1) tokens
    (the table's per-R rows), and draft passes for R requests."""
    n_slots = min(runtime.free_slots, max(batch_sizes))
    slots = [runtime.allocate_slot() for _ in range(n_slots)]
    try:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, runtime.vocab_size, (context_len,), generator=g)
        for slot in slots:  # prefill every slot once; passes below roll back to this length
            out = runtime.target_forward(prompt, torch.tensor([slot]), torch.tensor([context_len]), "last")
        taps_width = 0 if out.taps is None else out.taps.shape[1]
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

        verify = {b: verify_seconds(min(b, n_slots), b) for b in batch_sizes}
        request_counts = sorted({min(b, n_slots) for b in batch_sizes})
        tokens_per_request = range(1, (runtime.block_size or ROW_DRAFTS) + 2)
        rows = {}
        for r in request_counts:
            sizes = sorted({r * m for m in tokens_per_request if r * m <= max(batch_sizes)} | {r})
            rows[r] = (sizes, [1.0 / verify_seconds(r, b) for b in sizes])
        draft = {}
        if runtime.block_size:
            for r in request_counts:
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
