"""The portable target graph's contract (export/target_graph.py builds it, runtimes/target_graphs.py feeds it).

A ragged batch over a past-K/V window, returning the new K/V: the runtime keeps the slot cache itself
and passes, for the R requests of a pass, their past K/V stacked over layers [L, R, kv_heads, P, head_dim]
(P = longest past in the batch, at least 1; entries at or beyond a request's past length are masked). The
T new tokens stay flat; for attention they are gathered into a padded [R, Q] layout (Q = longest query)
and scattered back. The graph returns the new tokens' K/V [L, T, kv_heads, head_dim], which the runtime
writes into its cache at (slot, position) of each row: rollback stays a length change on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.verify_tail import VERIFY_OUTPUTS

INPUT_NAMES = ["input_ids", "positions", "past_k", "past_v", "past_lens", "query_lens", "gather_rows",
               "row_slots", "logits_rows"]


def output_names(tap_layers: Sequence[int], verify: bool = False) -> list[str]:
    return ["logits", "new_k", "new_v"] + (["taps"] if tap_layers else []) + (list(VERIFY_OUTPUTS) if verify else [])


@dataclass
class TargetStepInputs:
    """Numpy feeds for one pass, plus where each new row goes in the slot cache."""

    feeds: dict[str, np.ndarray]
    row_slot_ids: np.ndarray  # [T] cache slot of each new row
    row_positions: np.ndarray  # [T] cache position of each new row


def gather_past(cache, slots: np.ndarray, length: int) -> np.ndarray:
    """[L, R, kv_heads, length, head_dim]: the first `length` positions of each slot, every layer."""
    return np.stack([layer[slots, :, :length] for layer in cache])


def step_inputs(input_ids, slots, starts, query_lens, cache_k: np.ndarray, cache_v: np.ndarray,
                logits_rows: str | Sequence[int] = "last") -> TargetStepInputs:
    """Feeds for appending query_lens[r] tokens to slots[r], whose caches hold starts[r] positions.

    cache_k/cache_v: the runtime's cache, per layer [num_slots, kv_heads, max_seq, head_dim] (a list of
    arrays or one stacked array).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(query_lens, dtype=np.int64)
    if lens.sum() != ids.size or (lens < 1).any():
        raise DSparkError(f"query lengths {lens.tolist()} must be positive and sum to {ids.size} tokens")
    max_seq = cache_k[0].shape[2]
    if (starts + lens > max_seq).any():
        raise DSparkError(f"a request exceeds the cache limit {max_seq}")
    r, q_len, total = lens.size, int(lens.max()), int(lens.sum())
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    request_of_row = np.repeat(np.arange(r), lens)
    offset_in_request = np.arange(total) - first[request_of_row]
    gather_rows = np.zeros((r, q_len), dtype=np.int64)
    gather_rows[request_of_row, offset_in_request] = np.arange(total)
    p = max(1, int(starts.max()))
    if logits_rows == "last":
        rows = first + lens - 1
    elif logits_rows == "all":
        rows = np.arange(total)
    else:
        rows = np.asarray(logits_rows, dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "positions": (starts[request_of_row] + offset_in_request).astype(np.int64),
        "past_k": gather_past(cache_k, slots, p), "past_v": gather_past(cache_v, slots, p),
        "past_lens": starts, "query_lens": lens, "gather_rows": gather_rows,
        "row_slots": (request_of_row * q_len + offset_in_request).astype(np.int64),
        "logits_rows": rows.astype(np.int64),
    }
    return TargetStepInputs(feeds, slots[request_of_row], feeds["positions"])
