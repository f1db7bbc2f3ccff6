"""The drafter graph's contract (export/draft_graph.py builds it, runtimes/ort_drafter.py feeds it): a whole
draft pass in one call.

`draft` inputs (R requests, B = block size, L draft layers, V the target's vocabulary, N the draft vocabulary:
V, or the subset of a drafter with a reduced one):
  anchors [R] int64            each request's last committed token (block slot 0)
  ctx_lens [R] int64           context rows already cached per request
  ctx_k, ctx_v [L, R, kv, P, d] float32   the cached context K/V window (rows >= ctx_lens[r] are ignored)
  features [N, taps*H] float32 the target features new since each request's last pass, request-major; a
                               pass with none feeds one row that no request reads (new_lens all 0)
  positions [N] int64          each new row's position (its request's ctx_lens + i)
  new_rows [R, M] int64        per request, the indices of its new rows in `features` (padding: any index)
  new_lens [R] int64           new rows per request
  temperature [R] float32, top_k [R] int64, top_p [R] float32   spec.sampling's parameters per request
  uniforms [R, B] float32      the engine's uniform numbers, one per block position
outputs:
  tokens [R, B] int64          target ids
  probs [R, B, V] float32      the distribution q each token was drawn from, over the target vocabulary (zero
                               outside a reduced draft vocabulary); [R, B, 0] when every request is greedy (q is
                               then the one-hot of the token, left to the runtime)
  confidence_logits [R, B] float32   (only with a confidence head)
  new_k, new_v [L, N, kv, d] float32  the new rows' context K/V, to be cached at (request, position)
"""
from __future__ import annotations

import numpy as np

GRAPH_NAMES = ("draft",)
INPUTS = ["anchors", "ctx_lens", "ctx_k", "ctx_v", "features", "positions", "new_rows", "new_lens",
          "temperature", "top_k", "top_p", "uniforms"]
METADATA_WEIGHTS = "dspark.weights"  # the model property naming the weight format


def draft_feeds(slots, anchors, ctx_lens, cache_k, cache_v, new_features, feature_width: int, temperature, top_k,
                top_p, uniforms) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(feeds of `draft`, the slot and position of every row of new_k/new_v) for requests in `slots` whose
    context caches (per layer [num_slots, kv, max_seq, d]) hold ctx_lens rows; new_features[r] [n_r,
    feature_width] (or None) are request r's new rows. A row of new_k/new_v whose slot is -1 is padding."""
    slots = np.asarray(slots, dtype=np.int64)
    ctx_lens = np.asarray(ctx_lens, dtype=np.int64)
    r = len(slots)
    arrays = [np.asarray(f, dtype=np.float32) if f is not None else None for f in new_features]
    new_lens = np.array([0 if a is None else a.shape[0] for a in arrays], dtype=np.int64)
    rows = [a for a in arrays if a is not None and a.shape[0] > 0]
    n = int(new_lens.sum())
    p, m = max(1, int(ctx_lens.max())), max(1, int(new_lens.max()))
    if n:
        features = np.concatenate(rows)
        starts = np.concatenate([[0], np.cumsum(new_lens)[:-1]])
        positions = np.concatenate([ctx_lens[i] + np.arange(new_lens[i]) for i in range(r)])
        row_slots = np.repeat(slots, new_lens)
    else:  # one row nobody reads
        features = np.zeros((1, feature_width), np.float32)
        starts, positions, row_slots = np.zeros(r, np.int64), np.zeros(1, np.int64), np.full(1, -1)
    new_rows = np.minimum(starts[:, None] + np.arange(m), max(n, 1) - 1)
    feeds = {"anchors": np.asarray(anchors, dtype=np.int64), "ctx_lens": ctx_lens,
             "ctx_k": np.stack([layer[slots, :, :p] for layer in cache_k]),
             "ctx_v": np.stack([layer[slots, :, :p] for layer in cache_v]),
             "features": features, "positions": positions.astype(np.int64), "new_rows": new_rows.astype(np.int64),
             "new_lens": new_lens, "temperature": np.asarray(temperature, dtype=np.float32),
             "top_k": np.asarray(top_k, dtype=np.int64), "top_p": np.asarray(top_p, dtype=np.float32),
             "uniforms": np.asarray(uniforms, dtype=np.float32)}
    return feeds, row_slots, positions
