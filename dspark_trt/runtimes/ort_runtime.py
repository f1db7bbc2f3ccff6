"""ONNX Runtime (CPU) runtime over an engine directory: the exported target and drafter graphs.

The runtime keeps the target K/V slot pool (the same KVCache as the torch runtime: allocation,
lengths, rollback) and runs the target graph over it: a fused graph appends new rows in place in the
pool's buffers, a portable one gets the past window and returns the new rows (runtimes/target_graphs.py).
The drafter and its per-slot context cache are an `OrtDrafter` (runtimes/ort_drafter.py).

Verification runs in the target graph's DSparkVerify node (`target_verify`); a graph built without it,
and a pass with logit controls (spec/controls.py: applied to the logits the graph returns anyway), is
verified by the torch reference on the host, the same semantics.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.manifest import read_manifest
from dspark_trt.graphs.one_row_matmuls import one_row_padding
from dspark_trt.graphs.ort_session import make_session
from dspark_trt.graphs.verify_tail import VERIFY_OUTPUTS, no_verify_feeds, verify_feeds
from dspark_trt.models.drafter import DraftStep
from dspark_trt.models.target import TargetConfig, TargetStep
from dspark_trt.runtimes.base import Runtime
from dspark_trt.runtimes.kv_cache import KVCache
from dspark_trt.runtimes.ort_drafter import OrtDrafter
from dspark_trt.runtimes.target_graphs import PADDING_ROWS, FusedTargetGraph, PortableTargetGraph
from dspark_trt.spec.sampling import is_greedy
from dspark_trt.spec.verify import VerifyResult, greedy_verdict
from dspark_trt_plugins import ort_op


class OrtRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, engine_dir: str | Path, num_slots: int = 8, max_seq_len: int = 2048,
                 threads: int | None = None, use_drafter: bool = True, batch_invariant: bool = True,
                 taps: bool = False):
        """use_drafter: load the drafter's graph and context caches; taps: return the target's taps even
        without it (`dspark_target`, whose drafter runs in `dspark_draft`)."""
        engine_dir = Path(engine_dir)
        self.manifest = manifest = read_manifest(engine_dir)
        self.config = TargetConfig(**manifest["target"]["config"])
        self.vocab_size = self.config.vocab_size
        self.eos_token_ids = list(self.config.eos_token_ids)
        fused = manifest["target"].get("graph") == "fused"
        self.max_seq_len, pad = context_limit(manifest, max_seq_len, batch_invariant)
        self.num_slots = num_slots
        self.tap_layers: tuple[int, ...] = ()
        self.cache = KVCache(self.config, num_slots=num_slots, max_seq_len=self.max_seq_len + pad)
        self.sessions = {"target": self._make_session(engine_dir, "target", threads)}
        if fused:
            pad_matmuls, pad_head = one_row_padding(engine_dir / manifest["graphs"]["target"]["file"],
                                                    self.vocab_size, threads or len(os.sched_getaffinity(0)))
            self._target = FusedTargetGraph(self.sessions["target"], self.cache, batch_invariant=batch_invariant,
                                            pad_matmuls=pad_matmuls, pad_head=pad_head)
        else:
            self._target = PortableTargetGraph(self.sessions["target"], self.cache)
        self.verify_in_graph = set(VERIFY_OUTPUTS) <= set(self._target.outputs)
        self.drafter: OrtDrafter | None = None
        self.draft_config = None
        self.block_size, self.has_confidence_head = 0, False
        if manifest["draft"] is not None and use_drafter:
            self.drafter = OrtDrafter(engine_dir, manifest, num_slots, self.max_seq_len,
                                      make_graph_session=lambda name: self._make_session(engine_dir, name, threads))
            self.draft_config = self.drafter.config
            self.block_size, self.has_confidence_head = self.drafter.block_size, self.drafter.has_confidence_head
        if manifest["draft"] is not None and (use_drafter or taps):
            self.tap_layers = tuple(manifest["taps"])

    def _make_session(self, engine_dir: Path, graph: str, threads: int | None):
        """The session that runs one graph of the manifest (TrtRuntime swaps in a TensorRT plan). Only the
        target's big graph spins within a run (see make_session)."""
        return make_session(engine_dir / self.manifest["graphs"][graph]["file"], threads, spin=graph == "target")

    def _reset_draft_context(self, slot: int) -> None:
        if self.drafter is not None:
            self.drafter.reset(slot)

    # ---- passes ------------------------------------------------------------------------------
    def target_forward(self, input_ids, slots, query_lens, logits_rows: str) -> TargetStep:
        return self._target_pass(input_ids, slots, query_lens, logits_rows, None)[0]

    def target_verify(self, input_ids, slots, query_lens, draft_tokens, draft_probs, temperature, top_k, top_p,
                      uniforms, controls=None) -> tuple[TargetStep, VerifyResult]:
        """Verification inside the target graph's DSparkVerify node (Runtime.target_verify's contract). A pass
        whose requests are all greedy is verified natively instead: the graph's ArgMax output and
        `greedy_verdict`, the reference's own greedy rule (the node's Python call cost about 1 ms a step).
        A pass with `controls` is verified on the host, on the controlled logits."""
        if not self.verify_in_graph or controls is not None:
            return super().target_verify(input_ids, slots, query_lens, draft_tokens, draft_probs, temperature,
                                         top_k, top_p, uniforms, controls)
        lens = torch.as_tensor(query_lens, dtype=torch.long)
        row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        if "argmax" in self._target.outputs and bool(is_greedy(torch.as_tensor(temperature)).all()):
            step, outputs = self._target_pass(input_ids, slots, query_lens, "all", None)
            return step, greedy_verdict(torch.from_numpy(outputs["argmax"]), torch.as_tensor(draft_tokens),
                                        row_offsets)
        if len(draft_probs) < len(draft_tokens):  # a greedy pass: no q is read, but a kernel takes a row per draft
            draft_probs = np.zeros((len(draft_tokens), self.vocab_size), np.float32)
        args = (draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p, uniforms)
        rows = torch.arange(int(row_offsets[-1]))
        step, outputs = self._target_pass(input_ids, slots, query_lens, "all", verify_feeds(rows, *args))
        ort_op.check_outputs(outputs["accepted"], outputs["next_token"])
        return step, VerifyResult(accepted=torch.from_numpy(outputs["accepted"]),
                                  next_token=torch.from_numpy(outputs["next_token"]))

    def _target_pass(self, input_ids, slots, query_lens, logits_rows: str, verify: dict | None):
        """Run the target graph (which appends the new K/V rows to the cache); (step, outputs by name)."""
        slots_np = np.asarray(slots, dtype=np.int64)
        lens = np.asarray(query_lens, dtype=np.int64)
        extra = (verify or no_verify_feeds(self.vocab_size)) if self.verify_in_graph else {}
        outputs = self._target(np.asarray(input_ids), slots_np, lens, logits_rows, extra)
        self.cache.lengths[torch.as_tensor(slots_np)] += torch.as_tensor(lens)
        taps = torch.from_numpy(outputs["taps"]) if "taps" in outputs and self.tap_layers else None
        return TargetStep(logits=torch.from_numpy(outputs["logits"]), taps=taps), outputs

    def extend_context(self, slots, new_features) -> None:
        self._drafter().extend_context(slots, new_features)

    def draft(self, slots, new_features, anchors, temperature, top_k, top_p, uniforms) -> DraftStep:
        return self._drafter().draft(slots, new_features, anchors, temperature, top_k, top_p, uniforms)

    def _drafter(self) -> OrtDrafter:
        if self.drafter is None:
            raise DSparkError("this runtime has no drafter")
        return self.drafter


def context_limit(manifest: dict, max_seq_len: int = 2048, batch_invariant: bool = True) -> tuple[int, int]:
    """(the positions a slot may hold, the padding rows its target cache keeps past them) for an engine
    directory's manifest: the target and the drafter's context caches (in one process or two) agree on it."""
    fused = manifest["target"].get("graph") == "fused"
    pad = PADDING_ROWS if fused and batch_invariant else 0  # positions a padding row may take past the end
    limit = min(max_seq_len, (manifest.get("max_seq_len") or max_seq_len) - pad,
                manifest["target"]["config"]["max_position_embeddings"] - pad)
    return limit, pad
