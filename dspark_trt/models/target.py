"""The target decoder (Llama family, Qwen3) over a flattened ragged batch with a slot KV cache.

One forward takes the new tokens of several requests concatenated, each appended to its own KV
slot, and returns logits for the rows asked for plus the hidden states of the tap layers the
drafter needs. This is what `transformers` does not give: ragged batches, rollback (the cache
length is just set back) and taps of raw layer outputs. Without a cache (`cache=None`) the sequences are
fresh and nothing is kept: each layer's attention is then one causal call over the batch padded to its
longest sequence, as training's feature forward wants on a GPU (one call per sequence and layer bounded it).
A cache with `batched_decode` does the same for passes of one new token per request (plain decoding on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dspark_trt.errors import DSparkError, UnsupportedModelError
from dspark_trt.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary, rope_theta

SUPPORTED_ARCHITECTURES = ("llama", "qwen3")


@dataclass
class TargetConfig:
    arch: str  # "llama" or "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each head's queries and keys before RoPE."""
        return self.arch == "qwen3"

    @classmethod
    def from_hf(cls, hf) -> "TargetConfig":
        """From a transformers config object (config.json or GGUF metadata)."""
        arch = getattr(hf, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture '{arch}': supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
            raise UnsupportedModelError(f"{arch} with attention/MLP biases is not supported")
        scaling = getattr(hf, "rope_parameters", None) or {}
        if isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"RoPE type '{scaling['rope_type']}' is not supported (only 'default')")
        eos = hf.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        heads = hf.num_attention_heads
        return cls(
            arch=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=rope_theta(hf),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
        )


@dataclass
class TargetStep:
    """Result of one target pass (this model's, or any runtime's): logits of the requested rows and the tap
    features of every row."""

    logits: torch.Tensor  # [rows, V] float32
    taps: torch.Tensor | None  # [T, len(tap_layers) * hidden]


class Attention(nn.Module):
    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, layer: int, cache, batch: "RaggedBatch | DecodeBatch | PaddedBatch") -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:  # fresh sequences: right padding is never attended to under the causal mask
            out = F.scaled_dot_product_attention(batch.pad(q), batch.pad(k), batch.pad(v), is_causal=True,
                                                 enable_gqa=True)
            return self.o_proj(batch.unpad(out).reshape(t, -1))
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        if isinstance(batch, DecodeBatch):  # one new row per request, all requests in one masked call
            k_cache[batch.slots, :, batch.starts] = k
            v_cache[batch.slots, :, batch.starts] = v
            width = batch.mask.shape[-1]
            out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache[batch.slots, :, :width],
                                                 v_cache[batch.slots, :, :width], attn_mask=batch.mask,
                                                 enable_gqa=True)
            return self.o_proj(out.reshape(t, -1))
        out = torch.empty(t, self.num_heads, self.head_dim, dtype=x.dtype)
        for slot, start, lo, hi in batch.segments:
            end = start + hi - lo
            k_cache[slot, :, start:end] = k[lo:hi].transpose(0, 1)
            v_cache[slot, :, start:end] = v[lo:hi].transpose(0, 1)
            out[lo:hi] = _causal_attention(q[lo:hi], k_cache[slot, :, :end], v_cache[slot, :, :end], start)
        return self.o_proj(out.reshape(t, -1))


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [n, Hq, d] at positions start..start+n-1 over k/v [Hkv, start+n, d]; returns [n, Hq, d]."""
    n = q.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)
    kh, vh = k.unsqueeze(0), v.unsqueeze(0)
    if n == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
    elif start == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
    else:
        mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, layer, cache, batch):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class RaggedBatch:
    """Per request: (slot, cache length before this pass, first row, end row) in the flat batch."""

    segments: list[tuple[int, int, int, int]]


@dataclass
class DecodeBatch:
    """One new row per request (cache.batched_decode): the requests' slots and cache lengths before the pass, and
    the key mask [R, 1, 1, L] over the longest context L, on the model's device."""

    slots: torch.Tensor
    starts: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, ragged: RaggedBatch, device: torch.device) -> "DecodeBatch":
        slots = torch.tensor([slot for slot, *_ in ragged.segments], device=device)
        starts = torch.tensor([start for _, start, *_ in ragged.segments], device=device)
        width = int(starts.max()) + 1
        mask = torch.arange(width, device=device) <= starts[:, None]
        return cls(slots, starts, mask[:, None, None, :])


@dataclass
class PaddedBatch:
    """Fresh sequences of the flat batch laid out as [S, T] (T the longest): `index` holds each cell's row, or
    the row count for padding; `cells` each row's flat cell."""

    index: torch.Tensor  # [S, T]
    cells: torch.Tensor  # [rows]

    @classmethod
    def of(cls, query_lens: torch.Tensor, device: torch.device) -> "PaddedBatch":
        lens = query_lens.cpu()
        width = int(lens.max())
        column = torch.arange(width)
        valid = column < lens.unsqueeze(1)  # [S, T]
        index = torch.full(valid.shape, int(lens.sum()), dtype=torch.long)
        index[valid] = torch.arange(int(lens.sum()))
        return cls(index=index.to(device), cells=torch.nonzero(valid.flatten()).flatten().to(device))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, H, d] -> [S, H, T, d], zeros in the padding."""
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
        return x[self.index].transpose(1, 2)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[S, H, T, d] -> [rows, H, d]."""
        return x.transpose(1, 2).flatten(0, 1)[self.cells]


class TargetModel(nn.Module):
    def __init__(self, config: TargetConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        query_lens: torch.Tensor,
        cache,
        tap_layers: Sequence[int] = (),
        logits_rows: str | torch.Tensor = "last",
    ) -> TargetStep:
        """Append each request's tokens to its slot; see the module docstring for the contract.

        Request r's positions must be cache.lengths[slots[r]] + arange(query_lens[r]) (without a cache,
        arange(query_lens[r]); slots are then unused). Tap id l is the raw output of decoder layer l (before the
        final norm); -1 is the embedding output.
        """
        if cache is None:
            starts = torch.cumsum(query_lens, 0) - query_lens
            if bool((positions != torch.arange(positions.numel(), device=positions.device)
                     - torch.repeat_interleave(starts, query_lens).to(positions.device)).any()):
                raise DSparkError("without a cache every sequence is fresh: positions must count from 0")
            batch = PaddedBatch.of(query_lens, positions.device)
        else:
            batch = self._ragged_batch(positions, slots, query_lens, cache)
            if cache.batched_decode and bool((query_lens == 1).all()):
                batch = DecodeBatch.of(batch, positions.device)
        taps = sorted(set(tap_layers))
        if list(tap_layers) != taps:
            raise DSparkError(f"tap layers must be strictly increasing, got {list(tap_layers)}")
        tapped: list[torch.Tensor] = []
        x = self.embed_tokens(input_ids)
        if -1 in taps:
            tapped.append(x)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache, batch)
            if i in taps:
                tapped.append(x)
        if cache is not None:
            cache.lengths[slots] += query_lens
        if isinstance(logits_rows, str):
            if logits_rows == "last":
                x = x[query_lens.cumsum(0) - 1]
            elif logits_rows != "all":
                raise ValueError(f"logits_rows must be 'all', 'last' or row indices, got {logits_rows!r}")
        else:
            x = x[logits_rows]
        logits = self.lm_head(self.norm(x)).float()
        return TargetStep(logits=logits, taps=torch.cat(tapped, dim=-1) if tapped else None)

    def _ragged_batch(self, positions, slots, query_lens, cache) -> RaggedBatch:
        segments, row = [], 0
        for slot, n in zip(slots.tolist(), query_lens.tolist()):
            start = int(cache.lengths[slot])
            if start + n > cache.max_seq_len:
                raise DSparkError(f"slot {slot}: {start + n} tokens exceed the cache limit {cache.max_seq_len}")
            if positions[row] != start or positions[row + n - 1] != start + n - 1:
                raise DSparkError(
                    f"slot {slot}: positions must continue the cache at {start}, got {int(positions[row])}"
                )
            segments.append((slot, start, row, row + n))
            row += n
        if row != positions.numel():
            raise DSparkError(f"query lengths sum to {row} but {positions.numel()} tokens were given")
        return RaggedBatch(segments)
