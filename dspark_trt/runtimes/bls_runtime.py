"""The engine's Runtime split across Triton models: `dspark_target` and `dspark_draft` run the graphs
(serving/bls_services.py), the engine in `dspark_bls` reaches them through `call` (a BLS exec in Triton, a
direct call in tests).

The slot bookkeeping stays here, with the engine (which slots are free, how many target K/V rows and draft
context rows each slot holds); the two models keep only the K/V buffers, addressed by slot. Every call
carries the lengths it assumes, so rollback and freeing a slot cost no round trip: rows beyond a slot's
length are simply overwritten by the next pass.

An extend-only call returns nothing the engine needs, so it is sent from a helper thread and overlaps the
next target pass (in its own process); the next call of `dspark_draft` waits for it first, so the drafter
always sees its context complete and in order. Served at concurrency 1 this took the extension (about a
twelfth of a step) off the step's critical path.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dspark_trt.graphs.manifest import read_manifest
from dspark_trt.models.drafter import DraftStep
from dspark_trt.models.target import TargetConfig, TargetStep
from dspark_trt.runtimes.base import Runtime
from dspark_trt.runtimes.kv_cache import SlotTable
from dspark_trt.spec.verify import VerifyResult

TARGET_MODEL = "dspark_target"
DRAFT_MODEL = "dspark_draft"
TARGET_OUTPUTS = ["logits", "taps"]
VERIFY_OUTPUTS = ["accepted", "next_token", "taps"]
DRAFT_OUTPUTS = ["tokens", "probs", "confidence_logits"]
# call(model name, input arrays, wanted output names) -> output arrays
Call = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class BlsRuntime(Runtime):
    name = "triton-bls"

    def __init__(self, engine_dir: str | Path, call: Call, num_slots: int = 8, max_seq_len: int = 2048,
                 use_drafter: bool = True):
        manifest = read_manifest(engine_dir)
        config = TargetConfig(**manifest["target"]["config"])
        self.call = call
        self.vocab_size = config.vocab_size
        self.eos_token_ids = list(config.eos_token_ids)
        self.max_seq_len = min(max_seq_len, manifest.get("max_seq_len") or max_seq_len, config.max_position_embeddings)
        self.num_slots = num_slots
        draft = manifest["draft"] if use_drafter else None
        self.block_size = draft["block_size"] if draft else 0
        self.has_confidence_head = bool(draft and draft["confidence_head"])
        self.cache = SlotTable(num_slots, self.max_seq_len)  # the K/V buffers live in dspark_target
        self._lengths = self.cache.lengths.numpy()  # target K/V rows per slot (a view)
        self._context = np.zeros(num_slots, np.int64)  # draft context rows per slot
        self._extender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dspark-extend")
        self._extending: Future | None = None  # the extend-only call in flight

    def _reset_draft_context(self, slot: int) -> None:
        self._context[slot] = 0

    def target_forward(self, input_ids, slots, query_lens, logits_rows: str) -> TargetStep:
        slots_np, lens = np.asarray(slots, np.int64), np.asarray(query_lens, np.int64)
        out = self.call(TARGET_MODEL, {
            "input_ids": np.asarray(input_ids, np.int64), "slots": slots_np, "starts": self._lengths[slots_np],
            "query_lens": lens, "all_logits": np.array([logits_rows == "all"]),
        }, TARGET_OUTPUTS)
        self._lengths[slots_np] += lens
        taps = torch.from_numpy(out["taps"]) if self.block_size and out["taps"].size else None
        return TargetStep(logits=torch.from_numpy(out["logits"]), taps=taps)

    def target_verify(self, input_ids, slots, query_lens, draft_tokens, draft_probs, temperature, top_k, top_p,
                      uniforms, controls=None) -> tuple[TargetStep, VerifyResult]:
        """Verified in `dspark_target`'s graph: only the verdicts and taps come back, no logits. Greedy
        passes come with no draft probabilities (Runtime.target_verify), and send none. A pass with `controls`
        brings the logits back and is verified here, on the controlled logits (Runtime.target_verify)."""
        if controls is not None:
            return super().target_verify(input_ids, slots, query_lens, draft_tokens, draft_probs, temperature,
                                         top_k, top_p, uniforms, controls)
        slots_np, lens = np.asarray(slots, np.int64), np.asarray(query_lens, np.int64)
        temperature = np.asarray(temperature, np.float32)
        out = self.call(TARGET_MODEL, {
            "input_ids": np.asarray(input_ids, np.int64), "slots": slots_np, "starts": self._lengths[slots_np],
            "query_lens": lens, "all_logits": np.array([True]),
            "draft_tokens": np.asarray(draft_tokens, np.int64),
            "draft_probs": np.asarray(draft_probs, np.float32),
            "temperature": temperature, "top_k": np.asarray(top_k, np.int64),
            "top_p": np.asarray(top_p, np.float32), "uniforms": np.asarray(uniforms, np.float32),
        }, VERIFY_OUTPUTS)
        self._lengths[slots_np] += lens
        taps = torch.from_numpy(out["taps"]) if self.block_size and out["taps"].size else None
        verdict = VerifyResult(accepted=torch.from_numpy(out["accepted"]), next_token=torch.from_numpy(out["next_token"]))
        return TargetStep(logits=torch.zeros(0, self.vocab_size), taps=taps), verdict

    def extend_context(self, slots, new_features) -> None:
        """An extend-only call of `dspark_draft` (no anchors: nothing is drafted, nothing comes back), sent
        without waiting for it."""
        inputs = self._context_inputs(slots, new_features)
        self._await_extension()
        self._extending = self._extender.submit(self.call, DRAFT_MODEL, inputs, [])
        self._context[inputs["slots"]] += inputs["feature_counts"]

    def _await_extension(self) -> None:
        """Wait for the extend-only call in flight; its failure fails the caller's pass. No request of its own
        can make it fail (its rows always fit: the target already holds them), so a failure is dspark_draft's
        (its process died, the server stops), and every pass after it would fail as well."""
        extending, self._extending = self._extending, None
        if extending is not None:
            try:
                extending.result()
            except Exception as exc:
                raise RuntimeError(f"extending the drafter's context failed: {exc}") from exc

    def draft(self, slots, new_features, anchors, temperature, top_k, top_p, uniforms) -> DraftStep:
        inputs = self._context_inputs(slots, new_features)
        self._await_extension()
        out = self.call(DRAFT_MODEL, inputs | {
            "anchors": np.asarray(anchors, np.int64), "temperature": np.asarray(temperature, np.float32),
            "top_k": np.asarray(top_k, np.int64), "top_p": np.asarray(top_p, np.float32),
            "uniforms": np.asarray(uniforms, np.float64),
        }, DRAFT_OUTPUTS)
        self._context[inputs["slots"]] += inputs["feature_counts"]
        conf = out.get("confidence_logits")
        return DraftStep(tokens=torch.from_numpy(out["tokens"]), probs=torch.from_numpy(out["probs"]),
                         confidence_logits=torch.from_numpy(conf) if conf is not None and conf.size else None)

    def _context_inputs(self, slots, new_features) -> dict[str, np.ndarray]:
        """`dspark_draft`'s context inputs: the slots, the context rows each holds, their new rows (request-major)
        and how many each has."""
        slots_np = np.asarray(slots, np.int64)
        counts = np.array([0 if f is None else f.shape[0] for f in new_features], np.int64)
        width = next((f.shape[1] for f in new_features if f is not None), 0)
        features = np.concatenate([f.float().numpy() for f in new_features if f is not None and f.shape[0]]) \
            if counts.any() else np.zeros((0, width), np.float32)
        return {"slots": slots_np, "context_starts": self._context[slots_np], "features": features,
                "feature_counts": counts}
