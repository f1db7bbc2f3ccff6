"""The drafter graphs' contract (export/draft_graph.py builds them, runtimes/ort_drafter.py feeds them): `draft`, a
whole draft pass in one call, and `context`, the context extension of requests that do not draft this step.

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

`context` inputs: features [N, taps*H] float32 and positions [N] int64 as `draft`'s (at least one row);
outputs: new_k, new_v [L, N, kv, d] float32, what `draft` returns for the same rows (both graphs compute them
with one module). The engine calls it once a step for the requests that do not draft, so a draft pass only
ever carries one step's rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRAPH_NAMES = ("draft", "context")
INPUTS = ["anchors", "ctx_lens", "ctx_k", "ctx_v", "features", "positions", "new_rows", "new_lens",
          "temperature", "top_k", "top_p", "uniforms"]
CONTEXT_INPUTS = ["features", "positions"]
CONTEXT_OUTPUTS = ["new_k", "new_v"]
METADATA_WEIGHTS = "dspark.weights"  # the model property naming the weight format


@dataclass
class NewRows:
    """Requests' new context rows, request-major: the `features` and `positions` feeds, and where each row's
    K/V is cached."""

    features: np.ndarray  # [N, taps*H] float32
    positions: np.ndarray  # [N] int64
    slots: np.ndarray  # [N] int64, the slot of each row
    lens: np.ndarray  # [R] int64, rows per request


def new_rows(slots, ctx_lens, new_features, feature_width: int) -> NewRows:
    """The new rows of requests in `slots` whose context caches hold ctx_lens rows; new_features[r] [n_r,
    feature_width] (or None) are request r's, at positions ctx_lens[r] + i."""
    slots = np.asarray(slots, dtype=np.int64)
    ctx_lens = np.asarray(ctx_lens, dtype=np.int64)
    arrays = [np.zeros((0, feature_width), np.float32) if f is None else np.asarray(f, dtype=np.float32)
              for f in new_features]
    lens = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    positions = np.concatenate([start + np.arange(n, dtype=np.int64) for start, n in zip(ctx_lens, lens)])
    return NewRows(features=np.concatenate(arrays), positions=positions, slots=np.repeat(slots, lens), lens=lens)


def draft_feeds(slots, anchors, ctx_lens, cache_k, cache_v, rows: NewRows, temperature, top_k, top_p,
                uniforms) -> dict[str, np.ndarray]:
    """The feeds of `draft` for requests in `slots` whose context caches (per layer [num_slots, kv, max_seq, d])
    hold ctx_lens rows, with their new rows `rows`."""
    slots = np.asarray(slots, dtype=np.int64)
    ctx_lens = np.asarray(ctx_lens, dtype=np.int64)
    n = len(rows.positions)
    p, m = max(1, int(ctx_lens.max())), max(1, int(rows.lens.max()))
    starts = np.cumsum(rows.lens) - rows.lens
    features, positions = rows.features, rows.positions
    if not n:  # one row nobody reads
        features, positions = np.zeros((1, features.shape[1]), np.float32), np.zeros(1, np.int64)
    return {"anchors": np.asarray(anchors, dtype=np.int64), "ctx_lens": ctx_lens,
            "ctx_k": np.stack([layer[slots, :, :p] for layer in cache_k]),
            "ctx_v": np.stack([layer[slots, :, :p] for layer in cache_v]),
            "features": features, "positions": positions,
            "new_rows": np.minimum(starts[:, None] + np.arange(m), max(n, 1) - 1).astype(np.int64),
            "new_lens": rows.lens, "temperature": np.asarray(temperature, dtype=np.float32),
            "top_k": np.asarray(top_k, dtype=np.int64), "top_p": np.asarray(top_p, dtype=np.float32),
            "uniforms": np.asarray(uniforms, dtype=np.float32)}


def missing_graphs(manifest: dict) -> list[str]:
    """The drafter graphs this dspark-trt runs that an engine directory's manifest lacks (engines built by an
    older dspark-trt, before `context` existed); none for engines without a drafter."""
    if manifest.get("draft") is None:
        return []
    return [name for name in GRAPH_NAMES if name not in manifest["graphs"]]
