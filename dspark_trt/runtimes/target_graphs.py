"""Running a target step graph over the runtime's KV slot pool, one class per graph flavour.

- `FusedTargetGraph` (ONNX Runtime's fused operators, graphs/fused_target.py): the pool's per-layer
  buffers are bound (IO binding) as both past and present K/V, so GroupQueryAttention appends the new
  rows in place; nothing of the cache crosses the Python boundary. GroupQueryAttention's CPU kernel
  computes a one-row query with another matrix kernel (MLAS's M = 1 path) than a longer one, so a
  token's logits would depend on whether it came alone (plain decoding) or with drafts (verification),
  and greedy speculation would not equal greedy decoding. So attention sees every one-token query with
  a padding row after it (`min_query_len`): it writes a K/V row one position past the request's end,
  which the next token overwrites and no query reads, and the real row is the same as in a longer query.
  The pool keeps that one position (`PADDING_ROWS`). MatMulNBits has its own M = 1 kernel on some CPUs
  (AVX2 without AVX-512; graphs/one_row_matmuls.py asks this one, per weight format), and there no matmul
  sees one row either: a pass of a single token feeds that padding row through the layers' matmuls too
  (`pad_matmuls`), and a single logits row is computed twice where the LM head's kernel needs it
  (`pad_head`; the GGUF's 8-bit head computes one row alone as it does among others on AVX2, where a
  second row made it 2.8x slower). Plain decoding that never speculates (gen-data) may turn the padding
  off (`batch_invariant=False`).
- `PortableTargetGraph` (standard ONNX, graphs/target_graph.py, what TensorRT compiles): the batch's
  past window is gathered into the feeds and the returned new rows are written back on the host.

Both take the same call and return the graph's other outputs by name; the runtime keeps the lengths.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from dspark_trt.graphs.fused_target import cache_names, fused_feeds
from dspark_trt.graphs.ort_session import run
from dspark_trt.graphs.target_graph import step_inputs
from dspark_trt.runtimes.kv_cache import KVCache

PADDING_ROWS = 1  # a one-token query gets one padding row inside attention (batch invariance)


class FusedTargetGraph:
    """A fused target session whose K/V live in `cache`'s buffers, bound in place."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, batch_invariant: bool = True,
                 pad_matmuls: bool = True, pad_head: bool = True):
        self.session = session
        self.cache = cache
        self.batch_invariant = batch_invariant
        self.pad_matmuls = batch_invariant and pad_matmuls
        self.pad_head = batch_invariant and pad_head
        self._k = [k.numpy() for k in cache.k]
        self._v = [v.numpy() for v in cache.v]
        self.outputs = [o.name for o in session.get_outputs() if not o.name.startswith("present_")]
        self._inputs = [i.name for i in session.get_inputs() if not i.name.startswith("past_")]
        self._bindings: dict[int, ort.IOBinding] = {}

    def _binding(self, batch: int) -> ort.IOBinding:
        """The binding of slots [0, batch): small outputs first (so their results come first), then the
        cache buffers, each bound as past and present."""
        binding = self._bindings.get(batch)
        if binding is None:
            binding = self.session.io_binding()
            for name in self.outputs:
                binding.bind_output(name, "cpu")
            for layer, (k, v) in enumerate(zip(self._k, self._v)):
                past_k, past_v, present_k, present_v = cache_names(layer)
                for past, present, buffer in ((past_k, present_k, k), (past_v, present_v, v)):
                    value = ort.OrtValue.ortvalue_from_numpy(buffer[:batch])  # a view: no copy
                    binding.bind_ortvalue_input(past, value)
                    binding.bind_ortvalue_output(present, value)
            self._bindings[batch] = binding
        return binding

    def __call__(self, input_ids, slots: np.ndarray, query_lens, logits_rows: str, extra: dict) -> dict:
        starts = self.cache.lengths.numpy()[slots]
        inputs = fused_feeds(input_ids, slots, starts, query_lens, self.cache.max_seq_len, logits_rows,
                             min_query_len=1 + PADDING_ROWS if self.batch_invariant else 1,
                             min_rows=2 if self.pad_matmuls else 1, min_logits_rows=2 if self.pad_head else 1)
        binding = self._binding(inputs.batch)
        for name in self.outputs:  # rebound every run: a bound result would fix the next run's shape
            binding.bind_output(name, "cpu")
        feeds = inputs.feeds | extra
        for name in self._inputs:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        outputs = {name: values[i].numpy() for i, name in enumerate(self.outputs)}
        for name, real in (("taps", inputs.tokens), ("logits", inputs.logits), ("argmax", inputs.logits)):
            if name in outputs:
                outputs[name] = outputs[name][:real]
        return outputs


class PortableTargetGraph:
    """A portable target graph (or a TensorRT plan behind the same session interface) over a host cache."""

    def __init__(self, session, cache: KVCache):
        self.session = session
        self.cache = cache
        self._k = [k.numpy() for k in cache.k]
        self._v = [v.numpy() for v in cache.v]
        self.outputs = [o.name for o in session.get_outputs()]

    def __call__(self, input_ids, slots: np.ndarray, query_lens, logits_rows: str, extra: dict) -> dict:
        starts = self.cache.lengths.numpy()[slots]
        inputs = step_inputs(input_ids, slots, starts, query_lens, self._k, self._v, logits_rows)
        outputs = dict(zip(self.outputs, run(self.session, inputs.feeds | extra)))
        for layer, (k, v) in enumerate(zip(outputs.pop("new_k"), outputs.pop("new_v"))):
            self._k[layer][inputs.row_slot_ids, :, inputs.row_positions] = k
            self._v[layer][inputs.row_slot_ids, :, inputs.row_positions] = v
        return outputs
