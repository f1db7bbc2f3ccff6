"""A GGUF file's quantized weights as they are stored: blocks of 32 along the input dimension.

The int4/int8 engines carry these blocks into ONNX Runtime's MatMulNBits without re-quantizing
dequantized floats (ANCHORS: re-quantizing made onnxruntime-genai's int4 SmolLM2 diverge from
llama.cpp, which computes with the GGUF's own blocks). Block formats read here:

- Q4_0: w = d·(q − 8), q in 0..15
- Q4_1: w = d·q + m, q in 0..15 (a float minimum m per block)
- Q8_0: w = d·q, q in −128..127

Other tensor types are not returned (the exporter keeps those weights in float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
# type name -> (bytes per block, bits)
FORMATS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}


@dataclass
class BlockWeight:
    """Weight [N, K] (out, in) as blocks of 32 along K: w = scales·(q − offset) + mins."""

    format: str  # "Q4_0", "Q4_1" or "Q8_0"
    q: np.ndarray  # [N, K] uint8: 0..15 for 4-bit, q + 128 (0..255) for Q8_0
    scales: np.ndarray  # [N, K/32] float32
    mins: np.ndarray | None  # [N, K/32] float32 for Q4_1, else None

    @property
    def bits(self) -> int:
        return FORMATS[self.format][1]

    @property
    def offset(self) -> int:
        """The integer zero point of the format: w = d·(q − offset) (+ m)."""
        return {"Q4_0": 8, "Q4_1": 0, "Q8_0": 128}[self.format]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        """[N, K] float32, computed as gguf's reference dequantization does (d·q (+ m) in float32)."""
        n, k = self.q.shape
        q = self.q.reshape(n, k // BLOCK, BLOCK).astype(np.float32) - np.float32(self.offset)
        w = self.scales[..., None] * q
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(n, k)

    def rows(self, order: np.ndarray) -> "BlockWeight":
        """The same weight with its output rows reordered (blocks run along K, so this is exact)."""
        return BlockWeight(self.format, self.q[order], self.scales[order],
                           None if self.mins is None else self.mins[order])


def decode_blocks(type_name: str, raw: np.ndarray, n: int, k: int) -> BlockWeight:
    """Unpack a tensor's raw bytes [N, K/32 · block bytes] into a BlockWeight."""
    size, _ = FORMATS[type_name]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, size)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    mins = None
    if type_name == "Q8_0":
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        start = 4 if type_name == "Q4_1" else 2
        if type_name == "Q4_1":
            mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., start:start + BLOCK // 2]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # elements 0..15 low, 16..31 high
    return BlockWeight(type_name, q.reshape(n, k), scales, mins)


def read_block_weights(reader, name_of) -> dict[str, BlockWeight]:
    """Every 2-D tensor of the opened GGUF (models/gguf_reader.py) stored in a block format read here, keyed by
    name_of(gguf name) (None skips it). Shapes are [out, in] as in torch."""
    weights = {}
    for tensor in reader.tensors:
        fmt = tensor.tensor_type.name
        if fmt not in FORMATS or len(tensor.shape) != 2:
            continue
        name = name_of(tensor.name)
        if name is None:
            continue
        k, n = (int(d) for d in tensor.shape)  # GGUF lists ne0 (the contiguous, input dim) first
        weights[name] = decode_blocks(fmt, tensor.data, n, k)
    return weights
