"""ONNX Runtime (CPU) runtime over an engine directory: the exported target and drafter graphs.

The runtime keeps both caches on the host as numpy views of torch tensors: the target K/V slot pool
(the same KVCache as the torch runtime: allocation, lengths, rollback) and the drafter's per-slot
context K/V. Each pass gathers the batch's past window into the graph and writes the returned new
rows back at (slot, position). The drafter's left-to-right loop runs here with `spec.sampling`, one
`draft_markov_step` call per block position.

Verification runs in the target graph's DSparkVerify node (`target_verify`); a graph built without it
is verified by the torch reference on the returned logits, the same semantics.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.export.draft_graph import GRAPH_NAMES, block_inputs
from dspark_trt.export.engines import read_manifest
from dspark_trt.export.ort_session import make_session, run
from dspark_trt.export.target_graph import VERIFY_OUTPUTS, no_verify_feeds, step_inputs, verify_feeds
from dspark_trt.models.target import TargetConfig
from dspark_trt.runtimes.base import DraftStep, Runtime, TargetStep
from dspark_trt.runtimes.kv_cache import KVCache
from dspark_trt.spec.sampling import sample_from_uniform, warp_probs
from dspark_trt.spec.verify import VerifyResult
from dspark_trt_plugins import ort_op


class OrtRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, engine_dir: str | Path, num_slots: int = 8, max_seq_len: int = 2048,
                 threads: int | None = None, use_drafter: bool = True):
        from dspark_trt.models.drafter_checkpoint import config_from_dict

        engine_dir = Path(engine_dir)
        self.manifest = manifest = read_manifest(engine_dir)
        graphs = manifest["graphs"]
        self.config = TargetConfig(**manifest["target"]["config"])
        self.vocab_size = self.config.vocab_size
        self.eos_token_ids = list(self.config.eos_token_ids)
        self.max_seq_len = min(max_seq_len, manifest.get("max_seq_len") or max_seq_len,
                               self.config.max_position_embeddings)
        self.num_slots = num_slots
        self.tap_layers: tuple[int, ...] = ()
        self.cache = KVCache(self.config, num_slots=num_slots, max_seq_len=self.max_seq_len)
        self._k = [k.numpy() for k in self.cache.k]
        self._v = [v.numpy() for v in self.cache.v]
        self.sessions = {"target": self._make_session(engine_dir, "target", threads)}
        self._target_outputs = [o.name for o in self.sessions["target"].get_outputs()]
        self.verify_in_graph = set(VERIFY_OUTPUTS) <= set(self._target_outputs)
        self.draft_config = None
        self.block_size, self.has_confidence_head = 0, False
        if manifest["draft"] is not None and use_drafter:
            cfg = self.draft_config = config_from_dict(manifest["draft"]["config"], where=f"{engine_dir} manifest")
            self.block_size, self.has_confidence_head = cfg.block_size, cfg.enable_confidence_head
            self.tap_layers = tuple(manifest["taps"])
            self.sessions.update({name: self._make_session(engine_dir, name, threads)
                                  for name in GRAPH_NAMES if name in graphs})
            layout = SimpleNamespace(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                     head_dim=cfg.head_dim)
            # only its arrays and lengths are used: slots are allocated on the target cache
            self.context = KVCache(layout, num_slots=num_slots, max_seq_len=self.max_seq_len)
            self._ctx_k = [k.numpy() for k in self.context.k]
            self._ctx_v = [v.numpy() for v in self.context.v]

    def _make_session(self, engine_dir: Path, graph: str, threads: int | None):
        """The session that runs one graph of the manifest (TrtRuntime swaps in a TensorRT plan). Only the
        target's big graph spins within a run (see make_session)."""
        return make_session(engine_dir / self.manifest["graphs"][graph]["file"], threads, spin=graph == "target")

    # ---- slots -------------------------------------------------------------------------------
    def allocate_slot(self) -> int:
        slot = self.cache.allocate()
        if self.draft_config is not None:
            self.context.lengths[slot] = 0
        return slot

    def free_slot(self, slot: int) -> None:
        self.cache.free(slot)

    @property
    def free_slots(self) -> int:
        return self.cache.num_free

    def cache_length(self, slot: int) -> int:
        return int(self.cache.lengths[slot])

    def rollback(self, slot: int, length: int) -> None:
        self.cache.set_length(slot, length)

    # ---- passes ------------------------------------------------------------------------------
    def target_forward(self, input_ids, slots, query_lens, logits_rows: str) -> TargetStep:
        return self._target_pass(input_ids, slots, query_lens, logits_rows, None)[0]

    def target_verify(self, input_ids, slots, query_lens, draft_tokens, draft_probs, temperature, top_k, top_p,
                      uniforms) -> tuple[TargetStep, VerifyResult]:
        """Verification inside the target graph's DSparkVerify node (Runtime.target_verify's contract)."""
        if not self.verify_in_graph:
            return super().target_verify(input_ids, slots, query_lens, draft_tokens, draft_probs, temperature,
                                         top_k, top_p, uniforms)
        lens = torch.as_tensor(query_lens, dtype=torch.long)
        row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        args = (draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p, uniforms)
        rows = torch.arange(int(row_offsets[-1]))
        step, outputs = self._target_pass(input_ids, slots, query_lens, "all", verify_feeds(rows, *args))
        ort_op.check_outputs(outputs["accepted"], outputs["next_token"])
        return step, VerifyResult(accepted=torch.from_numpy(outputs["accepted"]),
                                  next_token=torch.from_numpy(outputs["next_token"]))

    def _target_pass(self, input_ids, slots, query_lens, logits_rows: str, verify: dict | None):
        """Run the target graph, write the new K/V rows into the cache; (step, all outputs by name)."""
        slots_np = np.asarray(slots, dtype=np.int64)
        starts = self.cache.lengths.numpy()[slots_np]
        inputs = step_inputs(np.asarray(input_ids), slots_np, starts, np.asarray(query_lens), self._k, self._v,
                             logits_rows)
        if self.verify_in_graph:
            inputs.feeds.update(verify or no_verify_feeds(self.vocab_size))
        outputs = dict(zip(self._target_outputs, run(self.sessions["target"], inputs.feeds)))
        for layer, (k, v) in enumerate(zip(outputs["new_k"], outputs["new_v"])):
            self._k[layer][inputs.row_slot_ids, :, inputs.row_positions] = k
            self._v[layer][inputs.row_slot_ids, :, inputs.row_positions] = v
        self.cache.lengths[torch.as_tensor(slots_np)] += torch.as_tensor(np.asarray(query_lens, dtype=np.int64))
        taps = torch.from_numpy(outputs["taps"]) if "taps" in outputs and self.draft_config is not None else None
        return TargetStep(logits=torch.from_numpy(outputs["logits"]), taps=taps), outputs

    def draft(self, slots, new_features, anchors, temperature, top_k, top_p, uniforms) -> DraftStep:
        hidden, base = self.backbone(slots, new_features, anchors)
        if uniforms is None:
            uniforms = torch.zeros(len(slots), self.block_size, dtype=torch.float64)
        return self._sample_block(torch.as_tensor(anchors), hidden, base, temperature, top_k, top_p, uniforms)

    def backbone(self, slots, new_features, anchors) -> tuple[np.ndarray, torch.Tensor]:
        """Append the new context features, then the parallel stage: block hidden [R, B, H], U [R, B, V]."""
        if self.draft_config is None:
            raise DSparkError("this runtime has no drafter")
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
        state = np.zeros((len(anchors), self.draft_config.markov_rank), np.float32)
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
