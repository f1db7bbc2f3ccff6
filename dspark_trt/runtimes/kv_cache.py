"""Slots: the one table of which requests hold which slot and how many positions each slot holds, and
the target's K/V pool addressed by it (preallocated, rolled back by length).

Every runtime keeps its slots in a SlotTable, its `cache` (the torch and ONNX Runtime runtimes a KVCache, the
Triton BLS runtime, whose buffers live in other processes, a plain SlotTable), and runtimes/base.py's Runtime
does the bookkeeping over it for all of them. Free slots are handed out
lowest first, so the slots in use stay packed at the front: a fused ONNX Runtime pass binds the range
[0, highest slot in the pass].
"""
from __future__ import annotations

import heapq
import math

import numpy as np
import torch

from dspark_trt.errors import DSparkError


class SlotTable:
    """num_slots slots of up to max_seq_len positions; `lengths[slot]` positions are valid."""

    def __init__(self, num_slots: int, max_seq_len: int):
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device="cpu")
        self._free = list(range(num_slots))  # a heap: the lowest free slot first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise DSparkError(f"KV cache full: all {self.num_slots} slots are in use")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise DSparkError(f"KV slot {slot} is not allocated")
        self._used.remove(slot)
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def set_length(self, slot: int, length: int) -> None:
        """Roll back to `length` positions (never forward: unwritten positions hold stale data)."""
        if not 0 <= length <= int(self.lengths[slot]):
            raise DSparkError(f"slot {slot}: cannot set length {length} (current {int(self.lengths[slot])})")
        self.lengths[slot] = length


class KVCache(SlotTable):
    """A SlotTable with per layer K and V of shape [num_slots, num_kv_heads, max_seq_len, head_dim].

    A request holds one slot from admission to finish. Its cache length says how many positions are
    valid; rolling back rejected draft tokens only sets the length back (later writes overwrite). The
    lengths stay on the CPU (bookkeeping); K and V live on `device`.

    batched_decode: a pass of one new token per request attends over all of them at once (the target's
    `DecodeBatch`: one attention call per layer, not one per request). Its results then depend on the batch in
    the last bits, so only plain decoding that needs no identity with speculation turns it on (gen-data on a GPU,
    where one call per request and layer bounds the step).
    """

    def __init__(self, config, num_slots: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", batched_decode: bool = False):
        super().__init__(num_slots, max_seq_len)
        self.batched_decode = batched_decode
        shape = (num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = [untouched_zeros(shape, dtype, device) for _ in range(config.num_layers)]
        self.v = [untouched_zeros(shape, dtype, device) for _ in range(config.num_layers)]


def untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Zeros whose pages stay untouched until written (numpy's calloc; torch.zeros writes every page), so a
    slot pool is resident only as far as requests have filled it: 16 slots of 2,048 positions are 1.5 GB for
    SmolLM2-135M. On an accelerator, plain zeros there."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(size, np.uint8)).view(dtype).view(shape)
