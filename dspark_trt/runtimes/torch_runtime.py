"""The torch reference runtime: our TargetModel with a slot KV cache, and the DSpark drafter.

The models run on the device their weights are on (CPU here; CUDA where present): the engine's tensors stay on
the CPU and cross to the device and back at each call, as the other runtimes' do."""
from __future__ import annotations

import dataclasses

import torch

from dspark_trt.devices import device_scope
from dspark_trt.errors import DSparkError
from dspark_trt.models.drafter import DraftStep
from dspark_trt.models.target import TargetModel, TargetStep
from dspark_trt.runtimes.base import Runtime
from dspark_trt.runtimes.kv_cache import KVCache


class TorchRuntime(Runtime):
    """Runs the reference torch modules (CPU here; CUDA where present)."""

    name = "torch"

    def __init__(self, target: TargetModel, drafter=None, num_slots: int = 8, max_seq_len: int = 2048,
                 batch_invariant: bool = True):
        """batch_invariant=False: decode passes attend over all requests in one call per layer (KVCache's
        batched_decode), for plain decoding that needs no identity with speculation (gen-data on a GPU)."""
        self.target = target
        self.drafter = drafter
        self.vocab_size = target.config.vocab_size
        self.eos_token_ids = list(target.config.eos_token_ids)
        self.max_seq_len = min(max_seq_len, target.config.max_position_embeddings)
        self.num_slots = num_slots
        weight = next(target.parameters())
        self.device = weight.device
        self.cache = KVCache(target.config, num_slots=num_slots, max_seq_len=self.max_seq_len,
                             dtype=weight.dtype, device=self.device, batched_decode=not batch_invariant)
        if drafter is not None:
            _check_pair(target, drafter)
            self.block_size = drafter.config.block_size
            self.has_confidence_head = drafter.config.enable_confidence_head
            self.tap_layers = tuple(drafter.config.target_layer_ids)
        else:
            self.block_size, self.has_confidence_head, self.tap_layers = 0, False, ()
        self._draft_states: dict[int, object] = {}

    def _reset_draft_context(self, slot: int) -> None:
        if self.drafter is not None:
            with device_scope(self.device):
                self._draft_states[slot] = self.drafter.new_state()

    @torch.inference_mode()
    def target_forward(self, input_ids, slots, query_lens, logits_rows: str) -> TargetStep:
        starts = self.cache.lengths[slots]
        with device_scope(self.device):  # tensors the model makes as it runs go where its weights are
            positions = torch.cat([torch.arange(int(s), int(s) + int(q)) for s, q in zip(starts, query_lens)])
            step = self.target(input_ids.to(self.device), positions, slots, query_lens, self.cache,
                               tap_layers=self.tap_layers, logits_rows=logits_rows)
        return _on_cpu(step)

    @torch.inference_mode()
    def extend_context(self, slots, new_features) -> None:
        with device_scope(self.device):
            for slot, features in zip(slots, new_features):
                self.drafter.extend_context(self._draft_states[int(slot)], features.to(self.device))

    @torch.inference_mode()
    def draft(self, slots, new_features, anchors, temperature, top_k, top_p, uniforms) -> DraftStep:
        states = [self._draft_states[int(s)] for s in slots]
        empty = torch.zeros(0, len(self.tap_layers) * self.target.config.hidden_size)
        features = [(f if f is not None else empty).to(self.device) for f in new_features]
        inputs = [None if t is None else t.to(self.device) for t in (anchors, temperature, top_k, top_p, uniforms)]
        with device_scope(self.device):
            return _on_cpu(self.drafter.draft_batch(states, features, *inputs))


def _on_cpu(result):
    """A TargetStep or DraftStep with its tensors on the CPU, where the engine works (no copy on the CPU)."""
    return dataclasses.replace(result, **{f.name: getattr(result, f.name).cpu() for f in dataclasses.fields(result)
                                          if isinstance(getattr(result, f.name), torch.Tensor)})


def _check_pair(target: TargetModel, drafter) -> None:
    """A drafter fits a target only if hidden size, vocabulary and tap layers agree."""
    t, d = target.config, drafter.config
    problems = []
    if d.hidden_size != t.hidden_size:
        problems.append(f"hidden_size {d.hidden_size} != target {t.hidden_size}")
    if d.vocab_size != t.vocab_size:
        problems.append(f"vocab_size {d.vocab_size} != target {t.vocab_size}")
    if d.num_target_layers != t.num_layers:
        problems.append(f"num_target_layers {d.num_target_layers} != target layers {t.num_layers}")
    if any(not -1 <= i < t.num_layers for i in d.target_layer_ids):
        problems.append(f"target_layer_ids {list(d.target_layer_ids)} outside the target's layers")
    if problems:
        raise DSparkError("drafter does not match the target: " + "; ".join(problems))
