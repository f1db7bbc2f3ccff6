"""The DSpark drafter's graph on ONNX Runtime, with the drafter's per-slot context cache.

The cache holds, per draft layer, each slot's context K/V (projected target features); a slot is
addressed by the target runtime's slot number and its length says how many context rows are valid.
A draft pass is one call of the `draft` graph (graphs/draft_graph.py): it takes the slots' cached
context windows, their new target features and the engine's uniforms, and returns the drafted block
(tokens, q, confidence logits) with the new rows' context K/V, which are written into the cache here.
Slots that do not draft get their new rows' K/V from the small `context` graph (`extend_context`).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.draft_graph import (CONTEXT_INPUTS, GRAPH_NAMES, METADATA_WEIGHTS, NewRows, draft_feeds,
                                           missing_graphs, new_rows)
from dspark_trt.graphs.ort_session import make_session, run
from dspark_trt.models.drafter import DraftStep
from dspark_trt.runtimes.kv_cache import KVCache


class OrtDrafter:
    """The drafter graph of an engine directory plus the context cache of `num_slots` slots."""

    def __init__(self, engine_dir: str | Path, manifest: dict, num_slots: int, max_seq_len: int,
                 threads: int | None = None, make_graph_session=None):
        from dspark_trt.models.drafter_checkpoint import config_from_dict

        engine_dir = Path(engine_dir)
        self.config = cfg = config_from_dict(manifest["draft"]["config"], where=f"{engine_dir} manifest")
        self.block_size = cfg.block_size
        self.has_confidence_head = cfg.enable_confidence_head
        self.max_seq_len = max_seq_len
        self.feature_width = cfg.num_taps * cfg.hidden_size
        missing = missing_graphs(manifest)
        if missing:
            raise DSparkError(f"{engine_dir}: the manifest has no drafter graph {missing} (engines built by an older "
                              "dspark-trt: rebuild them with `dspark-trt build-engines`)")
        make_graph_session = make_graph_session or (
            lambda name: make_session(engine_dir / manifest["graphs"][name]["file"], threads, spin=False))
        self.sessions = {name: make_graph_session(name) for name in GRAPH_NAMES}
        session = self.sessions["draft"]
        self._outputs = [o.name for o in session.get_outputs()]
        meta = getattr(session, "get_modelmeta", None)
        self.weights = meta().custom_metadata_map.get(METADATA_WEIGHTS, "fp32") if meta else "fp32"
        layout = SimpleNamespace(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                 head_dim=cfg.head_dim)
        # only its arrays and lengths are used: slots are allocated by the target runtime
        self.context = KVCache(layout, num_slots=num_slots, max_seq_len=max_seq_len)
        self._ctx_k = [k.numpy() for k in self.context.k]
        self._ctx_v = [v.numpy() for v in self.context.v]

    def reset(self, slot: int) -> None:
        """Forget a slot's context (a new request starts in it)."""
        self.context.lengths[slot] = 0

    def extend_context(self, slots, new_features) -> None:
        """Append each slot's new context features (each at least one row) to its cache: one `context` call."""
        rows = self._new_rows(slots, new_features, room=0)
        out = run(self.sessions["context"], {name: getattr(rows, name) for name in CONTEXT_INPUTS})
        self._store(rows, *out)

    def draft(self, slots, new_features, anchors, temperature, top_k, top_p, uniforms) -> DraftStep:
        """Append each slot's new context features, then draft one block per slot: one `draft` call. When every
        request is greedy, q comes back empty ([R, B, 0]; DraftStep.full_probs): the engine reads q only for a
        verification pass with sampled requests, and dspark_draft does not ship one-hots over BLS."""
        slots_np = np.asarray(slots, dtype=np.int64)
        rows = self._new_rows(slots_np, new_features, room=self.block_size)
        if uniforms is None:
            uniforms = np.zeros((len(slots_np), self.block_size), np.float32)
        feeds = draft_feeds(slots_np, _numpy(anchors, np.int64), self.context.lengths.numpy()[slots_np], self._ctx_k,
                            self._ctx_v, rows, _numpy(temperature, np.float32), _numpy(top_k, np.int64),
                            _numpy(top_p, np.float32), _numpy(uniforms, np.float32))
        out = dict(zip(self._outputs, run(self.sessions["draft"], feeds)))
        self._store(rows, out["new_k"], out["new_v"])
        conf = out.get("confidence_logits")
        return DraftStep(tokens=torch.from_numpy(out["tokens"]), probs=torch.from_numpy(out["probs"]),
                         confidence_logits=None if conf is None else torch.from_numpy(conf))

    def _new_rows(self, slots, new_features, room: int) -> NewRows:
        """The slots' new rows, once they fit in the cache with `room` positions to spare (a block's)."""
        slots = np.asarray(slots, dtype=np.int64)
        ctx_lens = self.context.lengths.numpy()[slots]
        rows = new_rows(slots, ctx_lens, [None if f is None else _numpy(f, np.float32) for f in new_features],
                        self.feature_width)
        too_long = ctx_lens + rows.lens + room > self.max_seq_len
        if too_long.any():
            i = int(np.flatnonzero(too_long)[0])
            block = f" + a block of {room}" if room else ""
            raise DSparkError(f"slot {int(slots[i])}: {ctx_lens[i]} context rows + {rows.lens[i]} new{block} exceed "
                              f"the draft context limit {self.max_seq_len}")
        return rows

    def _store(self, rows: NewRows, new_k: np.ndarray, new_v: np.ndarray) -> None:
        """Cache the rows' K/V [L, N, kv, d] at (slot, position) and count them."""
        if not len(rows.positions):
            return
        for layer, (k, v) in enumerate(zip(new_k, new_v)):
            self._ctx_k[layer][rows.slots, :, rows.positions] = k
            self._ctx_v[layer][rows.slots, :, rows.positions] = v
        np.add.at(self.context.lengths.numpy(), rows.slots, 1)


def _numpy(x, dtype) -> np.ndarray:
    return np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=dtype)
