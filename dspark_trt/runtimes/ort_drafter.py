"""The DSpark drafter's graph on ONNX Runtime, with the drafter's per-slot context cache.

The cache holds, per draft layer, each slot's context K/V (projected target features); a slot is
addressed by the target runtime's slot number and its length says how many context rows are valid.
A draft pass is one call of the `draft` graph (graphs/draft_graph.py): it takes the slots' cached
context windows, their new target features and the engine's uniforms, and returns the drafted block
(tokens, q, confidence logits) with the new rows' context K/V, which are written into the cache here.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.draft_graph import GRAPH_NAMES, METADATA_WEIGHTS, draft_feeds
from dspark_trt.graphs.ort_session import make_session, run
from dspark_trt.models.drafter import DraftStep
from dspark_trt.runtimes.kv_cache import KVCache
from dspark_trt.spec.sampling import greedy_probs


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
        missing = [name for name in GRAPH_NAMES if name not in manifest["graphs"]]
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

    def draft(self, slots, new_features, anchors, temperature, top_k, top_p, uniforms) -> DraftStep:
        """Append each slot's new context features, then draft one block per slot: one graph call."""
        slots_np = np.asarray(slots, dtype=np.int64)
        r = len(slots_np)
        lengths = self.context.lengths.numpy()
        ctx_lens = lengths[slots_np].copy()
        new_lens = np.array([0 if f is None else f.shape[0] for f in new_features], dtype=np.int64)
        too_long = ctx_lens + new_lens + self.block_size > self.max_seq_len
        if too_long.any():
            i = int(np.flatnonzero(too_long)[0])
            raise DSparkError(f"slot {int(slots_np[i])}: {ctx_lens[i]} context rows + {new_lens[i]} new + a block of "
                              f"{self.block_size} exceed the draft context limit {self.max_seq_len}")
        if uniforms is None:
            uniforms = np.zeros((r, self.block_size), np.float32)
        features = [None if f is None else _numpy(f, np.float32) for f in new_features]
        feeds, row_slots, positions = draft_feeds(
            slots_np, _numpy(anchors, np.int64), ctx_lens, self._ctx_k, self._ctx_v, features, self.feature_width,
            _numpy(temperature, np.float32), _numpy(top_k, np.int64), _numpy(top_p, np.float32),
            _numpy(uniforms, np.float32))
        out = dict(zip(self._outputs, run(self.sessions["draft"], feeds)))
        if new_lens.any():
            for layer, (k, v) in enumerate(zip(out["new_k"], out["new_v"])):
                self._ctx_k[layer][row_slots, :, positions] = k
                self._ctx_v[layer][row_slots, :, positions] = v
            lengths[slots_np] += new_lens
        tokens, probs = out["tokens"], out["probs"]
        if probs.shape[-1] == 0:  # every request greedy: q is the one-hot of each token (target ids, target vocab)
            probs = greedy_probs(tokens, self.config.vocab_size)
        conf = out.get("confidence_logits")
        return DraftStep(tokens=torch.from_numpy(tokens), probs=torch.from_numpy(probs),
                         confidence_logits=None if conf is None else torch.from_numpy(conf))


def _numpy(x, dtype) -> np.ndarray:
    return np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=dtype)
