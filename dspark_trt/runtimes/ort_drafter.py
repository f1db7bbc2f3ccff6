"""The DSpark drafter's graphs on ONNX Runtime, with the drafter's per-slot context cache.

The cache holds, per draft layer, each slot's context K/V (projected target features); a slot is
addressed by the target runtime's slot number and its length says how many context rows are valid.
Each draft pass first appends the new target features (`draft_context`), then runs the block
backbone (`draft_block`) and the left-to-right Markov loop with `spec.sampling`, one
`draft_markov_step` call per block position, and the confidence head.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.export.draft_graph import GRAPH_NAMES, block_inputs
from dspark_trt.export.ort_session import make_session, run
from dspark_trt.runtimes.base import DraftStep
from dspark_trt.runtimes.kv_cache import KVCache
from dspark_trt.spec.sampling import sample_from_uniform, warp_probs


class OrtDrafter:
    """Drafter graphs of an engine directory plus the context cache of `num_slots` slots."""

    def __init__(self, engine_dir: str | Path, manifest: dict, num_slots: int, max_seq_len: int,
                 threads: int | None = None, make_graph_session=None):
        from dspark_trt.models.drafter_checkpoint import config_from_dict

        engine_dir = Path(engine_dir)
        self.config = cfg = config_from_dict(manifest["draft"]["config"], where=f"{engine_dir} manifest")
        self.block_size = cfg.block_size
        self.has_confidence_head = cfg.enable_confidence_head
        self.max_seq_len = max_seq_len
        make_graph_session = make_graph_session or (
            lambda name: make_session(engine_dir / manifest["graphs"][name]["file"], threads, spin=False))
        self.sessions = {name: make_graph_session(name) for name in GRAPH_NAMES if name in manifest["graphs"]}
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
        hidden, base = self.backbone(slots, new_features, anchors)
        if uniforms is None:
            uniforms = torch.zeros(len(slots), self.block_size, dtype=torch.float64)
        return self._sample_block(torch.as_tensor(anchors), hidden, base, temperature, top_k, top_p, uniforms)

    def backbone(self, slots, new_features, anchors) -> tuple[np.ndarray, torch.Tensor]:
        """Append the new context features, then the parallel stage: block hidden [R, B, H], U [R, B, V]."""
        slots_np = np.asarray(slots, dtype=np.int64)
        self._extend_context(slots_np, new_features)
        ctx_lens = self.context.lengths.numpy()[slots_np]
        if (ctx_lens + self.block_size > self.max_seq_len).any():
            raise DSparkError(f"draft block beyond the context limit {self.max_seq_len}")
        hidden, base = run(self.sessions["draft_block"],
                           block_inputs(np.asarray(anchors), ctx_lens, self._ctx_k, self._ctx_v, slots_np))
        return hidden, torch.from_numpy(base)

    def _extend_context(self, slots: np.ndarray, new_features) -> None:
        """One draft_context pass over every slot's new features; rows written at each slot's next positions."""
        rows = [(int(s), f) for s, f in zip(slots, new_features) if f is not None and f.shape[0] > 0]
        if not rows:
            return
        lengths = self.context.lengths.numpy()
        for s, f in rows:
            if lengths[s] + f.shape[0] > self.max_seq_len:
                raise DSparkError(f"slot {s}: draft context exceeds the limit {self.max_seq_len}")
        row_slots = np.concatenate([np.full(f.shape[0], s) for s, f in rows])
        positions = np.concatenate([np.arange(lengths[s], lengths[s] + f.shape[0]) for s, f in rows])
        features = torch.cat([f for _, f in rows]).to(torch.float32).numpy()
        ctx_k, ctx_v = run(self.sessions["draft_context"], {"features": features, "positions": positions})
        for layer, (k, v) in enumerate(zip(ctx_k, ctx_v)):
            self._ctx_k[layer][row_slots, :, positions] = k
            self._ctx_v[layer][row_slots, :, positions] = v
        for s, f in rows:
            lengths[s] += f.shape[0]

    def _sample_block(self, anchors, hidden, base_logits, temperature, top_k, top_p, uniforms) -> DraftStep:
        """As DSparkDrafter._sample_block: ℓ_k = U_k + B_k(x_{k-1}); x_k ~ warp(ℓ_k), left to right."""
        step = self.sessions.get("draft_markov_step")
        state = np.zeros((len(anchors), self.config.markov_rank), np.float32)
        prev = anchors
        prevs, tokens, probs = [], [], []
        for k in range(self.block_size):
            logit_k = base_logits[:, k]
            if step is not None:
                bias, *rest = run(step, {"prev": prev.numpy().astype(np.int64), "hidden": hidden[:, k],
                                         "state": state})
                state = rest[0] if rest else state
                logit_k = logit_k + torch.from_numpy(bias)
            q = warp_probs(logit_k, temperature, top_k, top_p)
            token = sample_from_uniform(q, uniforms[:, k])
            prevs.append(prev)
            tokens.append(token)
            probs.append(q)
            prev = token
        conf = None
        if "draft_confidence" in self.sessions:
            (c,) = run(self.sessions["draft_confidence"],
                       {"hidden": hidden, "prev_tokens": torch.stack(prevs, 1).numpy().astype(np.int64)})
            conf = torch.from_numpy(c)
        return DraftStep(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1), confidence_logits=conf)
