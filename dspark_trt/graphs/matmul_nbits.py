"""The packed layouts of ONNX Runtime's `com.microsoft::MatMulNBits` that our graphs write (the fused target's
GGUF blocks, the drafter's block-quantized weights, the one-row probe), and TensorRT's INT4 raw data, which
packs the same way: two 4-bit values per byte, the first in the low nibble.
"""
from __future__ import annotations

import numpy as np


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis (even length) into one uint8 each, the first in the low nibble; values are
    taken modulo 16, so signed INT4 codes pack as two's complement."""
    v = np.asarray(values).astype(np.int16) & 0xF
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' zero points input from [N, blocks] values: flat uint8, each row padded to whole bytes."""
    zp = np.asarray(zero_points, dtype=np.uint8)
    if bits == 8:
        return zp.reshape(-1)
    return pack_nibbles(np.pad(zp, ((0, 0), (0, zp.shape[1] % 2)))).reshape(-1)
