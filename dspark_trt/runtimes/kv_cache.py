"""Slot pool for the target's K/V: preallocated, addressed by slot, rolled back by length."""
from __future__ import annotations

import torch

from dspark_trt.errors import DSparkError


class KVCache:
    """Per layer K and V of shape [num_slots, num_kv_heads, max_seq_len, head_dim].

    A request holds one slot from admission to finish. Its cache length says how many positions are
    valid; rolling back rejected draft tokens only sets the length back (later writes overwrite).
    """

    def __init__(self, config, num_slots: int, max_seq_len: int, dtype: torch.dtype = torch.float32):
        shape = (num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]
        self.max_seq_len = max_seq_len
        self.num_slots = num_slots
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self._free = list(range(num_slots - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise DSparkError(f"KV cache full: all {self.num_slots} slots are in use")
        slot = self._free.pop()
        self._used.add(slot)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise DSparkError(f"KV slot {slot} is not allocated")
        self._used.remove(slot)
        self.lengths[slot] = 0
        self._free.append(slot)

    def set_length(self, slot: int, length: int) -> None:
        """Roll back to `length` positions (never forward: unwritten positions hold stale data)."""
        if not 0 <= length <= int(self.lengths[slot]):
            raise DSparkError(f"slot {slot}: cannot set length {length} (current {int(self.lengths[slot])})")
        self.lengths[slot] = length
