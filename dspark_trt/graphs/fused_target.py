"""The fused target graph's contract (export/fused_target.py builds it, runtimes feed it).

The K/V cache is one buffer per layer and kind, [slots, kv_heads, capacity, head_dim], bound as both
`past_key_<i>` and `present_key_<i>` (ONNX Runtime's GroupQueryAttention then writes only the new rows,
in place). A pass binds a contiguous range of slots [0, B): attention runs over the padded layout
[B, S] (S = longest query of the pass), where slots not in the pass have query length 0 and are left
untouched. The new tokens stay packed [T] for everything else: `gather_rows` [B, S] picks each padded
row's packed token, `row_slots` [T] each packed token's padded row. Positions are implicit in the
lengths: a slot's new rows go at [start, start + query length).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from dspark_trt.errors import DSparkError

# name -> (element type, dims)
INPUTS = {
    "input_ids": (TensorProto.INT64, ["tokens"]),
    "gather_rows": (TensorProto.INT64, ["batch", "query"]),
    "row_slots": (TensorProto.INT64, ["tokens"]),
    "positions_padded": (TensorProto.INT64, ["batch", "query"]),
    "seqlens_k": (TensorProto.INT32, ["batch"]),
    "query_lens": (TensorProto.INT32, ["batch"]),
    "total_sequence_length": (TensorProto.INT32, []),
    "logits_rows": (TensorProto.INT64, ["rows"]),
}


def cache_names(layer: int) -> tuple[str, str, str, str]:
    """(past_key, past_value, present_key, present_value) of a layer."""
    return f"past_key_{layer}", f"past_value_{layer}", f"present_key_{layer}", f"present_value_{layer}"


@dataclass
class FusedFeeds:
    feeds: dict[str, np.ndarray]
    batch: int  # B: the pass binds cache slots [0, B)
    tokens: int  # the pass's real packed rows: per-row outputs (taps) beyond them are padding
    logits: int  # the real logits rows: those beyond them (and their argmax) are padding


def fused_feeds(input_ids, slots, starts, query_lens, capacity: int,
                logits_rows: str | np.ndarray = "last", min_query_len: int = 1, min_rows: int = 1,
                min_logits_rows: int = 1) -> FusedFeeds:
    """Feeds for appending query_lens[r] tokens to slots[r], whose caches hold starts[r] positions.

    logits_rows: "last" (each request's last row), "all", or packed row indices.
    min_query_len: attention's query of a request has at least this many rows; the padding rows after
    its tokens (a copy of packed row 0) write K/V rows past the request's end that no real row reads.
    min_rows (1 or 2, the latter with min_query_len > 1): no matmul of the layers sees fewer rows, for CPUs
    where MatMulNBits' M = 1 kernel differs from its M >= 2 one (graphs/one_row_matmuls.py): a pass of one
    token feeds a copy of it as the row that attention's padding row reads. min_logits_rows (1 or 2): the
    same for the LM head, whose kernel may agree where the layers' do not: one logits row is gathered twice.
    The copies' outputs are padding (`tokens` and `logits` count the real rows).
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    slots = np.asarray(slots, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(query_lens, dtype=np.int64)
    if lens.sum() != ids.size or (lens < 1).any():
        raise DSparkError(f"query lengths {lens.tolist()} must be positive and sum to {ids.size} tokens")
    if len(set(slots.tolist())) != slots.size:
        raise DSparkError(f"a pass takes each slot once, got slots {slots.tolist()}")
    attended = np.maximum(lens, min_query_len)  # query rows inside attention, padding included
    s = int(attended.max())
    if (starts + attended > capacity).any() or s + 1 > capacity:
        raise DSparkError(f"a request exceeds the cache limit {capacity}")
    batch = int(slots.max()) + 1
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    request_of_row = np.repeat(np.arange(lens.size), lens)
    offset = np.arange(ids.size) - first[request_of_row]
    gather_rows = np.zeros((batch, s), dtype=np.int64)
    gather_rows[slots[request_of_row], offset] = np.arange(ids.size)
    positions = np.zeros((batch, s), dtype=np.int64)
    positions[slots] = starts[:, None] + np.arange(s)
    seqlens_k = np.zeros(batch, dtype=np.int32)  # an idle slot: no query, one (ignored) past row
    seqlens_k[slots] = starts + attended - 1
    q_lens = np.zeros(batch, dtype=np.int32)
    q_lens[slots] = attended
    if isinstance(logits_rows, str):
        rows = first + lens - 1 if logits_rows == "last" else np.arange(ids.size)
    else:
        rows = np.asarray(logits_rows)
    if min_rows > 1 and min_query_len < 2:
        raise DSparkError("a matmul padding row needs attention's padding row (min_query_len >= 2)")
    logits = rows.size
    if logits == 1 and min_logits_rows > 1:
        rows = np.repeat(rows, 2)
    row_slots = slots[request_of_row] * s + offset
    tokens = ids.size
    if tokens == 1 and min_rows > 1:  # the matmuls' second row: attention's padding row of the request
        ids, row_slots = np.repeat(ids, 2), np.array([row_slots[0], row_slots[0] + 1])
        gather_rows[slots[0], 1] = 1
    feeds = {
        "input_ids": ids, "gather_rows": gather_rows, "row_slots": row_slots,
        "positions_padded": positions, "seqlens_k": seqlens_k, "query_lens": q_lens,
        "total_sequence_length": np.array(int(seqlens_k.max()) + 1, dtype=np.int32),
        "logits_rows": rows.astype(np.int64),
    }
    return FusedFeeds(feeds, batch, tokens, logits)
