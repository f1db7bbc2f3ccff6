"""The interface every runtime (torch, ONNX Runtime, TensorRT, Triton BLS) offers the engine.

The engine drives target passes and draft passes through this interface only, so the same loop
runs on any backend. A runtime owns the target KV slot pool and the drafter's per-slot context
cache; the engine addresses both by slot. The slot bookkeeping is written here, once, over the
runtime's SlotTable (runtimes/kv_cache.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from dspark_trt.models.drafter import DraftStep
from dspark_trt.models.target import TargetStep
from dspark_trt.runtimes.kv_cache import SlotTable
from dspark_trt.spec.controls import History, apply_controls
from dspark_trt.spec.verify import VerifyResult, dspark_verify


class Runtime(ABC):
    """Target + drafter behind slots. Positions are implicit: a slot's tokens are appended in order."""

    # which slots are taken and how many target positions each holds (a KVCache where the K/V live in this process)
    cache: SlotTable
    vocab_size: int
    eos_token_ids: list[int]  # the target's stop ids, the default stop condition of a request
    max_seq_len: int
    num_slots: int
    block_size: int  # 0 when there is no drafter
    has_confidence_head: bool
    name: str

    def allocate_slot(self) -> int:
        """Reserve a target KV slot (and its draft context cache); raises when none is free."""
        slot = self.cache.allocate()
        self._reset_draft_context(slot)
        return slot

    def free_slot(self, slot: int) -> None:
        """Release the slot and forget its cached target K/V and draft context."""
        self.cache.free(slot)
        self._reset_draft_context(slot)

    def _reset_draft_context(self, slot: int) -> None:
        """Forget the drafter's context of a slot (a runtime with a drafter keeps one per slot)."""

    @property
    def free_slots(self) -> int:
        return self.cache.num_free

    def cache_length(self, slot: int) -> int:
        return int(self.cache.lengths[slot])

    def rollback(self, slot: int, length: int) -> None:
        """Drop target K/V beyond `length` (rejected draft positions)."""
        self.cache.set_length(slot, length)

    @abstractmethod
    def target_forward(self, input_ids: torch.Tensor, slots: torch.Tensor, query_lens: torch.Tensor,
                       logits_rows: str) -> TargetStep:
        """Append query_lens[r] tokens to slot slots[r] for each r, in one ragged pass.

        logits_rows: "last" (one row per request) or "all" (every row). Taps are returned for all rows
        when the runtime has a drafter.
        """

    def target_verify(self, input_ids: torch.Tensor, slots: torch.Tensor, query_lens: torch.Tensor,
                      draft_tokens: torch.Tensor, draft_probs: torch.Tensor, temperature: torch.Tensor,
                      top_k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
                      controls: Sequence[History | None] | None = None) -> tuple[TargetStep, VerifyResult]:
        """A decode pass: request r appends [anchor, d_0 .. d_{l-1}] (query_lens[r] = l + 1 rows), and the
        DSparkVerify op (plugins/SCHEMA.md) accepts a prefix of each draft. draft_probs holds q of every draft
        token [N, V], or nothing [0, V] when every request of the pass is greedy (greedy verification reads none).

        Without `controls` the engine reads only the verdicts and the taps, so a runtime may return the logits
        empty (the served one does, to spare the transfer). With `controls` (one History per request, None for
        a request without controls: given when a request of the pass has logit controls or wants log-probs)
        the target logits are controlled (spec.controls.apply_controls) before verification and the step
        returns the raw logits. This default verifies with the torch reference on the host; a runtime whose
        target graph ends in the DSparkVerify node verifies there the passes without controls."""
        step = self.target_forward(input_ids, slots, query_lens, "all")
        row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.as_tensor(query_lens).long().cumsum(0)])
        logits = step.logits if controls is None else apply_controls(step.logits, row_offsets, draft_tokens,
                                                                     controls, temperature)
        return step, dspark_verify(logits, draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p,
                                   uniforms)

    @abstractmethod
    def extend_context(self, slots: torch.Tensor, new_features: list[torch.Tensor]) -> None:
        """Append each slot's new context features (at least one row each) to its draft cache, without drafting:
        a request that does not draft this step, so that its next draft carries one step's rows, not a backlog.
        The K/V appended are those `draft` would append for the same rows."""

    @abstractmethod
    def draft(self, slots: torch.Tensor, new_features: list[torch.Tensor | None], anchors: torch.Tensor,
              temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              uniforms: torch.Tensor) -> DraftStep:
        """Append each slot's new context features to its draft cache, then draft one block per slot."""
