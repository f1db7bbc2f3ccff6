"""The DSpark drafter: parallel block backbone with target-context K/V injection, Markov head,
confidence head (DSPARK_SPEC.md sections 1-2 and 4.4).

A block is [anchor, MASK x (B-1)] at positions p..p+B-1 (p = context length). Every draft layer
attends from the block to [context ; block] without a mask; the context keys/values are the layer's
k/v projections of the projected target features c = hidden_norm(fc(taps)), computed once per
context token and kept in a per-request cache. The block's own K/V are never kept. Slot k's parallel
logits U_k plus the Markov bias B_k(x_{k-1}) give the distribution the k-th draft token is drawn
from, left to right.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dspark_trt.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from dspark_trt.models.markov_heads import ConfidenceHead, make_markov_head
from dspark_trt.spec.sampling import sample_from_uniform, warp_probs


@dataclass
class DrafterConfig:
    """The fields of a DeepSpec DSpark config.json that define the drafter (raw keeps all the rest)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # draft layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int
    markov_rank: int = 0
    markov_head_type: str | None = None
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)

    @property
    def output_vocab_size(self) -> int:
        """Rows of the LM head and the Markov head's output."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def reduced_vocab(self) -> bool:
        return self.output_vocab_size < self.vocab_size


@dataclass
class DraftState:
    """Per-request context cache: per draft layer, the context K/V [n_kv, n, d] (after norm + RoPE)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0


@dataclass
class DraftOutput:
    """One block for one request (the reference API)."""

    tokens: torch.Tensor  # [B] target ids
    logits: torch.Tensor  # [B, N] U + B over the draft vocabulary: what the tokens were drawn from
    base_logits: torch.Tensor  # [B, N] U
    probs: torch.Tensor  # [B, V] the warped distribution q of each token, over the target vocabulary
    confidence_logits: torch.Tensor | None  # [B]
    block_hidden: torch.Tensor  # [B, H]


@dataclass
class DraftStep:
    """One draft pass for R requests (B = block size), as every runtime returns it; the torch drafter also
    returns what the tokens were drawn from (logits, base_logits) and the block's hidden states."""

    tokens: torch.Tensor  # [R, B] target ids
    # [R, B, V] the distribution q each token was drawn from, over the target vocabulary; a runtime may return
    # [R, B, 0] when every request drafted greedily (q is then each token's one-hot: full_probs)
    probs: torch.Tensor
    confidence_logits: torch.Tensor | None  # [R, B] pre-sigmoid, None without a confidence head
    logits: torch.Tensor | None = None  # [R, B, N] U + B over the draft vocabulary
    base_logits: torch.Tensor | None = None  # [R, B, N] U
    block_hidden: torch.Tensor | None = None  # [R, B, H]

    def full_probs(self, vocab_size: int) -> torch.Tensor:
        """q [R, B, V], spelled out as one-hots where a greedy pass left it empty (only a verification pass that
        mixes in sampled requests reads it: 0.2 MB a draft token)."""
        if self.probs.shape[-1]:
            return self.probs
        return F.one_hot(self.tokens, vocab_size).float()


class DraftAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.block_size = cfg.block_size
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def context_kv(self, ctx: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [n_kv, n, d] of projected context features [n, H] at their positions (the exported graphs run
        this code: only n is left to -1, so they hold constant shapes)."""
        k = apply_rotary(self.k_norm(self.k_proj(ctx).view(-1, self.n_kv, self.head_dim)), cos, sin)
        v = self.v_proj(ctx).view(-1, self.n_kv, self.head_dim)
        return k.transpose(0, 1), v.transpose(0, 1)

    def forward(self, a: torch.Tensor, cos, sin, contexts: list[tuple[torch.Tensor, torch.Tensor]],
                context_masks: list[torch.Tensor] | None = None):
        """Block states a [R, b, H] attend to each request's context K/V and to their block.

        Inference passes no mask: a row is one block, which sees all its context and itself. Training packs
        many blocks into one row per sequence and passes a mask [b, n_ctx] per row (True = may attend):
        each block of the row sees the context the mask allows and its own block only (spec 1.4).
        """
        r, b, _ = a.shape
        q = apply_rotary(self.q_norm(self.q_proj(a).view(r, b, self.n_heads, self.head_dim)), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(a).view(r, b, self.n_kv, self.head_dim)), cos, sin)
        v = self.v_proj(a).view(r, b, self.n_kv, self.head_dim)
        out = torch.empty_like(q)
        for i, (ctx_k, ctx_v) in enumerate(contexts):
            if context_masks is not None:
                out[i] = self._blockwise(q[i], k[i], v[i], ctx_k, ctx_v, context_masks[i])
                continue
            keys = torch.cat([ctx_k, k[i].transpose(0, 1)], dim=1).unsqueeze(0)
            values = torch.cat([ctx_v, v[i].transpose(0, 1)], dim=1).unsqueeze(0)
            att = F.scaled_dot_product_attention(q[i].transpose(0, 1).unsqueeze(0), keys, values, enable_gqa=True)
            out[i] = att.squeeze(0).transpose(0, 1)
        return self.o_proj(out.reshape(r, b, -1))

    def _blockwise(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor,
                   ctx_v: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        """One training row of w/B blocks (q [w, heads, d], k/v [w, n_kv, d]): one softmax over the context scores
        ctx_mask [w, n] allows and the block's own B scores. The same attention as a dense mask [w, n + w],
        without its w x w block-to-block scores (at 512 anchors per sequence the largest cost of a training step)."""
        w, n, bs = q.shape[0], ctx_k.shape[1], self.block_size
        g, d, blocks = self.n_heads // self.n_kv, self.head_dim, w // bs
        qh = q.transpose(0, 1).reshape(self.n_kv, g, w, d) * d ** -0.5  # query head h uses K/V head h // g
        ctx_scores = (qh @ ctx_k.unsqueeze(1).transpose(-1, -2)).masked_fill(~ctx_mask, float("-inf"))
        kb = k.transpose(0, 1).reshape(self.n_kv, 1, blocks, bs, d)
        vb = v.transpose(0, 1).reshape(self.n_kv, 1, blocks, bs, d)
        block_scores = qh.reshape(self.n_kv, g, blocks, bs, d) @ kb.transpose(-1, -2)
        probs = torch.cat([ctx_scores, block_scores.reshape(self.n_kv, g, w, bs)], dim=-1).softmax(-1)
        ctx_probs, block_probs = probs.split([n, bs], dim=-1)
        out = ctx_probs @ ctx_v.unsqueeze(1) + (block_probs.reshape(self.n_kv, g, blocks, bs, bs) @ vb).reshape(
            self.n_kv, g, w, d)
        return out.reshape(self.n_heads, w, d).transpose(0, 1)


class DraftLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, contexts, context_masks=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, contexts, context_masks)
        return x + self.mlp(self.post_attention_layernorm(x))


class DSparkDrafter(nn.Module):
    """Parameter names match DeepSpec's checkpoints (no `model.` prefix)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.fc = nn.Linear(config.num_taps * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        n = config.output_vocab_size
        self.lm_head = nn.Linear(h, n, bias=False)
        self.markov_head = (make_markov_head(config.markov_head_type, config.vocab_size, n, h, config.markov_rank)
                            if config.markov_rank > 0 else None)
        if config.reduced_vocab:
            self.register_buffer("d2t", torch.zeros(n, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        if config.enable_confidence_head:
            with_markov = config.confidence_head_with_markov and self.markov_head is not None
            self.confidence_head = ConfidenceHead(h + (config.markov_rank if with_markov else 0))
        else:
            self.confidence_head = None
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    # ---- draft vocabulary --------------------------------------------------------------------
    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Store the draft vocabulary (target ids, ascending) as d2t offsets and the t2d mask."""
        ids = torch.as_tensor(target_ids, dtype=torch.long)
        if ids.shape != self.d2t.shape or not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError(f"a draft vocabulary is {self.d2t.numel()} ascending distinct target ids")
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """Target id of every draft id (None for a full-vocabulary drafter)."""
        if not self.config.reduced_vocab:
            return None
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def to_draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft id of each target id; -1 where the token is outside the draft vocabulary."""
        if not self.config.reduced_vocab:
            return target_ids
        index = torch.cumsum(self.t2d.long(), 0) - 1
        return torch.where(self.t2d[target_ids], index[target_ids], -1)

    # ---- context cache -----------------------------------------------------------------------
    def new_state(self) -> DraftState:
        empty = torch.zeros(self.config.num_key_value_heads, 0, self.config.head_dim,
                            dtype=self.embed_tokens.weight.dtype)
        n = self.config.num_hidden_layers
        return DraftState(keys=[empty] * n, values=[empty] * n)

    @torch.no_grad()
    def extend_context(self, state: DraftState, features: torch.Tensor) -> None:
        """Project new target features [n, taps*H] once and append their K/V to every layer's cache."""
        n = features.shape[0]
        if n == 0:
            return
        kv = self.context_kv(features, torch.arange(state.length, state.length + n))
        for i, (k, v) in enumerate(kv):
            state.keys[i] = torch.cat([state.keys[i], k], dim=1)
            state.values[i] = torch.cat([state.values[i], v], dim=1)
        state.length += n

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per draft layer, K/V [n_kv, n, d] of target features [n, taps*H] at their positions."""
        if features.shape[1] != self.fc.in_features:
            raise ValueError(f"context features have width {features.shape[1]}, expected {self.fc.in_features} "
                             f"({self.config.num_taps} taps x hidden {self.config.hidden_size})")
        ctx = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))
        cos, sin = self.rotary(positions, ctx.dtype)
        return [layer.self_attn.context_kv(ctx, cos, sin) for layer in self.layers]

    def backbone(self, block_ids: torch.Tensor, positions: torch.Tensor, contexts: list[list[tuple]],
                 context_masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [R, b, H], U [R, b, N] float32) of block rows; contexts[layer][row] = that row's context K/V."""
        x = self.embed_tokens(block_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer, layer_contexts in zip(self.layers, contexts):
            x = layer(x, cos, sin, layer_contexts, context_masks)
        hidden = self.norm(x)
        return hidden, self.lm_head(hidden).float()

    # ---- training (teacher forcing, packed blocks; spec 1.4 and 6.3) ---------------------------
    def forward_packed(self, features: torch.Tensor, ctx_positions: torch.Tensor, ctx_seq: torch.Tensor,
                       anchor_ids: torch.Tensor, anchor_positions: torch.Tensor, anchor_seq: torch.Tensor,
                       prev_tokens: torch.Tensor):
        """Training forward of A blocks over the packed context of several sequences.

        features [M, taps*H] at ctx_positions [M] of sequences ctx_seq [M]; block j has its anchor
        anchor_ids[j] at anchor_positions[j] of sequence anchor_seq[j] and sees that sequence's
        context strictly before the anchor plus its own block. prev_tokens [A, B] are the
        teacher-forced previous tokens of the Markov and confidence heads (slot 0: the anchor).
        Returns (corrected logits ℓ [A, B, N], U [A, B, N] over the draft vocabulary, confidence logits
        [A, B] or None).
        """
        b = self.config.block_size
        a = anchor_ids.shape[0]
        kv = self.context_kv(features, ctx_positions)
        # one row per sequence, holding just its blocks (no padding to the longest: the linears and the LM head
        # cost what the blocks need), each block attending to the context before its anchor and to itself
        order = torch.argsort(anchor_seq, stable=True)
        hidden, base_logits = [], []
        for seq in torch.unique(anchor_seq).tolist():
            blocks = order[anchor_seq[order] == seq]
            block_ids = torch.full((len(blocks), b), self.config.mask_token_id, dtype=torch.long)
            block_ids[:, 0] = anchor_ids[blocks]
            positions = anchor_positions[blocks].unsqueeze(1) + torch.arange(b)
            rows = ctx_seq == seq
            contexts = [[(k[:, rows], v[:, rows])] for k, v in kv]
            sees_ctx = ctx_positions[rows].unsqueeze(0) < positions[:, :1].repeat_interleave(b, dim=0)
            h, u = self.backbone(block_ids.view(1, -1), positions.view(1, -1), contexts, [sees_ctx])
            hidden.append(h.view(len(blocks), b, -1))
            base_logits.append(u.view(len(blocks), b, -1))
        back = torch.argsort(order)  # from sequence order to the anchors' order
        hidden, base_logits = torch.cat(hidden)[back], torch.cat(base_logits)[back]
        logits = base_logits
        if self.markov_head is not None:
            head = self.markov_head
            state = head.initial_state(a, hidden)
            biases = []
            for k in range(b):
                bias, state = head.step(prev_tokens[:, k], hidden[:, k], state)
                biases.append(bias.float())
            logits = base_logits + torch.stack(biases, dim=1)
        return logits, base_logits, self.confidence_logits(hidden, prev_tokens)

    def confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        """s_k from [h_k ; W1[x_{k-1}]] (or h_k alone); prev_tokens [R, B] start with the anchor."""
        if self.confidence_head is None:
            return None
        features = hidden
        if self.confidence_head.proj.in_features > hidden.shape[-1]:
            features = torch.cat([hidden, self.markov_head.markov_w1(prev_tokens)], dim=-1)
        return self.confidence_head(features).float()

    # ---- drafting ----------------------------------------------------------------------------
    @torch.no_grad()
    def draft(self, state: DraftState, ctx_features: torch.Tensor, anchor_id: int, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> DraftOutput:
        """Reference single-request API: append ctx_features, then draft one block after anchor_id."""
        b = self.config.block_size
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        u = torch.rand(1, b, generator=generator, dtype=torch.float64)
        out = self.draft_batch([state], [ctx_features], torch.tensor([int(anchor_id)]), torch.tensor([temperature]),
                               torch.tensor([top_k]), torch.tensor([top_p]), u)
        conf = out.confidence_logits[0] if out.confidence_logits is not None else None
        return DraftOutput(out.tokens[0], out.logits[0], out.base_logits[0], out.probs[0], conf, out.block_hidden[0])

    @torch.no_grad()
    def draft_batch(self, states: list[DraftState], ctx_features: list[torch.Tensor], anchor_ids: torch.Tensor,
                    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    uniforms: torch.Tensor | None) -> DraftStep:
        """One block per request: parallel backbone for all R, then the sequential Markov loop."""
        cfg = self.config
        r, b = len(states), cfg.block_size
        for state, features in zip(states, ctx_features):
            self.extend_context(state, features)
        block_ids = torch.full((r, b), cfg.mask_token_id, dtype=torch.long)
        block_ids[:, 0] = anchor_ids
        positions = torch.tensor([s.length for s in states]).unsqueeze(1) + torch.arange(b)
        contexts = [[(s.keys[i], s.values[i]) for s in states] for i in range(cfg.num_hidden_layers)]
        hidden, base_logits = self.backbone(block_ids, positions, contexts)
        if uniforms is None:
            uniforms = torch.zeros(r, b, dtype=torch.float64)
        return self._sample_block(anchor_ids, hidden, base_logits, temperature, top_k, top_p, uniforms)

    def _sample_block(self, anchor_ids, hidden, base_logits, temperature, top_k, top_p, uniforms) -> DraftStep:
        """The Markov loop drawing x_k from warp(ℓ_k) (spec.sampling) over the draft vocabulary, as a target id,
        with q spread over the target vocabulary (zero mass outside the draft vocabulary)."""
        draft_ids = self.draft_ids

        def draw(k: int, logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = warp_probs(logit, temperature, top_k, top_p)
            token = sample_from_uniform(q, uniforms[:, k])
            if draft_ids is None:
                return token, q
            return draft_ids[token], q.new_zeros(q.shape[0], self.config.vocab_size).index_copy_(1, draft_ids, q)

        tokens, probs, logits, conf = self.markov_loop(anchor_ids, hidden, base_logits, draw)
        return DraftStep(tokens=tokens, probs=probs, confidence_logits=conf, logits=logits, base_logits=base_logits,
                         block_hidden=hidden)

    def markov_loop(self, anchor_ids: torch.Tensor, hidden: torch.Tensor, base_logits: torch.Tensor,
                    draw: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        """The block left to right, the one loop of a draft pass (the exported graph runs it with its own `draw`):
        ℓ_k = U_k + B_k(x_{k-1}); (x_k, q_k) = draw(k, ℓ_k), x_k a target id and q_k over the target vocabulary;
        then the confidences from the drawn prefix. Returns tokens [R, B], q [R, B, V], ℓ [R, B, N] and the
        confidence logits [R, B] (None without a confidence head)."""
        r, b, _ = base_logits.shape
        head = self.markov_head
        state = head.initial_state(r, hidden) if head is not None else None
        prev = anchor_ids
        prevs, tokens, logits, probs = [], [], [], []
        for k in range(b):
            logit_k = base_logits[:, k]
            if head is not None:
                bias, state = head.step(prev, hidden[:, k], state)
                logit_k = logit_k + bias.float()
            token, q = draw(k, logit_k)
            prevs.append(prev)
            tokens.append(token)
            logits.append(logit_k)
            probs.append(q)
            prev = token
        conf = self.confidence_logits(hidden, torch.stack(prevs, dim=1))
        return torch.stack(tokens, 1), torch.stack(probs, 1), torch.stack(logits, 1), conf
