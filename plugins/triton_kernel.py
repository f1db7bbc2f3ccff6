"""DSparkVerify as one fused Triton-language kernel: one program per request, the vocabulary in tiles.

Each program warps its target rows (temperature, top-k, top-p), runs the acceptance test row by row
until the first rejection, builds the residual (or bonus) distribution and draws the next token by
inverse CDF from the given uniform: the same rule as `dspark_trt.spec.verify.dspark_verify`, which is
the reference it is tested against.

No row is ever held whole: every reduction (max, argmax, softmax sum, residual mass, CDF search) loops
over BLOCK_V-wide tiles, so a 49,152-token vocabulary needs no giant block. Top-k and top-p become one
cut per row, "keep the tokens whose scaled logit is >= cut", found without sorting by bisection over
the order-preserving integer keys of float32 values (<= 32 passes over the row each): the smallest key
with fewer than k tokens above it (top-k), and the smallest key with less than top_p of the top-k mass
above it (top-p). That is exactly "a token's rank / the kept mass strictly above it" of the reference.
Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark_trt.spec.sampling import GREEDY_TEMPERATURE
from dspark_trt.spec.verify import RESIDUAL_FLOOR, VerifyResult

MAX_BLOCK_V = 1024  # tile width for large vocabularies (smaller vocabularies use one power-of-two tile)


@triton.jit
def _key(s):
    """Order-preserving int64 key of float32 values: a < b iff _key(a) < _key(b)."""
    b = s.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)


@triton.jit
def _scaled_tile(logits_ptr, row, vocab, t, offs):
    valid = offs < vocab
    x = tl.load(logits_ptr + row * vocab + offs, mask=valid, other=float("-inf"))
    return x / t, valid


@triton.jit
def _p_of(s, idx, valid, greedy, top, cut, z, amax):
    """Warped probability of tokens idx with scaled logits s, given their row's statistics."""
    kept = valid & (_key(s) >= cut)
    probs = tl.where(kept, tl.exp(s - top) / z, 0.0)
    return tl.where(greedy, tl.where(valid & (idx == amax), 1.0, 0.0), probs)


@triton.jit
def _count_above(logits_ptr, row, vocab, t, mid, BLOCK_V: tl.constexpr):
    n = tl.zeros([], dtype=tl.int64)
    for v0 in range(0, vocab, BLOCK_V):
        s, valid = _scaled_tile(logits_ptr, row, vocab, t, v0 + tl.arange(0, BLOCK_V))
        n += tl.sum((valid & (_key(s) > mid)).to(tl.int64), axis=0)
    return n


@triton.jit
def _mass_above(logits_ptr, row, vocab, t, top, cut, z, mid, BLOCK_V: tl.constexpr):
    """Probability mass (normalised by z) of the tokens kept by `cut` whose key is above mid."""
    m = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        s, valid = _scaled_tile(logits_ptr, row, vocab, t, v0 + tl.arange(0, BLOCK_V))
        k = _key(s)
        m += tl.sum(tl.where(valid & (k >= cut) & (k > mid), tl.exp(s - top) / z, 0.0), axis=0)
    return m


@triton.jit
def _kept_sum(logits_ptr, row, vocab, t, top, cut, BLOCK_V: tl.constexpr):
    z = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        s, valid = _scaled_tile(logits_ptr, row, vocab, t, v0 + tl.arange(0, BLOCK_V))
        z += tl.sum(tl.where(valid & (_key(s) >= cut), tl.exp(s - top), 0.0), axis=0)
    return z


@triton.jit
def _row_stats(logits_ptr, row, vocab, temperature, top_k, top_p, BLOCK_V: tl.constexpr, GREEDY_T: tl.constexpr):
    """(greedy, t, top, cut, z, amax) of one target row: p_j = exp(s_j - top) / z if key(s_j) >= cut, else 0,
    where s = logits / t; greedy rows are the one-hot of amax, the first argmax of the raw logits."""
    greedy = temperature < GREEDY_T
    t = tl.where(greedy, 1.0, temperature)
    top = tl.full([], float("-inf"), tl.float32)
    low = tl.full([], float("inf"), tl.float32)
    amax = tl.zeros([], dtype=tl.int64)
    for v0 in range(0, vocab, BLOCK_V):
        s, valid = _scaled_tile(logits_ptr, row, vocab, t, v0 + tl.arange(0, BLOCK_V))
        tile_top = tl.max(s, axis=0)
        amax = tl.where(tile_top > top, v0 + tl.argmax(s, axis=0).to(tl.int64), amax)
        top = tl.maximum(top, tile_top)
        low = tl.minimum(low, tl.min(tl.where(valid, s, float("inf")), axis=0))
    key_top = _key(top)
    cut = _key(low)
    if (top_k > 0) & (top_k < vocab) & (temperature >= GREEDY_T):
        lo = cut
        hi = key_top
        while lo < hi:  # smallest key with fewer than top_k tokens strictly above it
            mid = lo + (hi - lo) // 2
            fewer = _count_above(logits_ptr, row, vocab, t, mid, BLOCK_V) < top_k
            hi = tl.where(fewer, mid, hi)
            lo = tl.where(fewer, lo, mid + 1)
        cut = lo
    z = _kept_sum(logits_ptr, row, vocab, t, top, cut, BLOCK_V)
    if (top_p < 1.0) & (temperature >= GREEDY_T):
        lo = cut
        hi = key_top
        while lo < hi:  # smallest key with less than top_p of the kept mass strictly above it
            mid = lo + (hi - lo) // 2
            less = _mass_above(logits_ptr, row, vocab, t, top, cut, z, mid, BLOCK_V) < top_p
            hi = tl.where(less, mid, hi)
            lo = tl.where(less, lo, mid + 1)
        cut = lo
        z = _kept_sum(logits_ptr, row, vocab, t, top, cut, BLOCK_V)
    return greedy, t, top, cut, z, amax


@triton.jit
def _q_of(q_ptr, draft_row, vocab, token, idx, valid, HAS_Q: tl.constexpr):
    """Draft distribution q at tokens idx (one-hot of the draft token when drafting was greedy)."""
    if HAS_Q:
        q = tl.load(q_ptr + draft_row * vocab + idx, mask=valid, other=0.0)
    else:
        q = tl.where(valid & (idx == token), 1.0, 0.0)
    return q


@triton.jit
def _dist_tile(logits_ptr, q_ptr, row, draft_row, token, vocab, offs, greedy, t, top, cut, z, amax, use_residual,
               HAS_Q: tl.constexpr):
    """One tile of the next-token distribution: the residual max(0, p - q) or p itself."""
    s, valid = _scaled_tile(logits_ptr, row, vocab, t, offs)
    p = _p_of(s, offs, valid, greedy, top, cut, z, amax)
    q = _q_of(q_ptr, draft_row, vocab, token, offs, offs < tl.where(use_residual, vocab, 0), HAS_Q)
    return tl.where(use_residual, tl.maximum(p - q, 0.0), p)


@triton.jit
def dspark_verify_kernel(logits_ptr, draft_tokens_ptr, q_ptr, row_offsets_ptr, temperature_ptr,
                         top_k_ptr, top_p_ptr, uniforms_ptr, accepted_ptr, next_token_ptr, vocab,
                         HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr, GREEDY_T: tl.constexpr, FLOOR: tl.constexpr):
    r = tl.program_id(0)
    start = tl.load(row_offsets_ptr + r)
    last = tl.load(row_offsets_ptr + r + 1) - 1
    temperature = tl.load(temperature_ptr + r)
    top_k = tl.load(top_k_ptr + r)
    top_p = tl.load(top_p_ptr + r)

    # acceptance: walk the draft rows until the first rejection; `stop` is where the draw happens
    stop = last
    row = start
    going = row < last
    while going:
        greedy, t, top, cut, z, amax = _row_stats(logits_ptr, row, vocab, temperature, top_k, top_p, BLOCK_V, GREEDY_T)
        token = tl.load(draft_tokens_ptr + row - r)
        s_d = tl.load(logits_ptr + row * vocab + token) / t
        p_d = _p_of(s_d, token, token < vocab, greedy, top, cut, z, amax)
        q_d = _q_of(q_ptr, row - r, vocab, token, token, token < vocab, HAS_Q)
        ratio = tl.minimum(p_d / tl.maximum(q_d, FLOOR), 1.0)
        accept = tl.load(uniforms_ptr + row) < ratio
        stop = tl.where(accept, stop, row)
        row += 1
        going = accept & (row < last)
    tl.store(accepted_ptr + r, (stop - start).to(tl.int64))

    # the next token: residual max(0, p - q) at a rejection (p if it has no mass), else the bonus p
    greedy, t, top, cut, z, amax = _row_stats(logits_ptr, stop, vocab, temperature, top_k, top_p, BLOCK_V, GREEDY_T)
    rejected = stop < last
    draft_row = stop - r  # the rejected draft (no such row for a bonus draw: then q is not read)
    token = tl.zeros([], dtype=tl.int64)
    residual_mass = tl.zeros([], dtype=tl.float32)
    if rejected:
        token = tl.load(draft_tokens_ptr + draft_row)
        for v0 in range(0, vocab, BLOCK_V):
            tile = _dist_tile(logits_ptr, q_ptr, stop, draft_row, token, vocab, v0 + tl.arange(0, BLOCK_V),
                              greedy, t, top, cut, z, amax, rejected, HAS_Q)
            residual_mass += tl.sum(tile, axis=0)
    use_residual = rejected & (residual_mass > FLOOR)
    # inverse CDF: the CDF is a running sum of tile cumsums; idx = how many CDF entries are <= the target
    total = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        tile = _dist_tile(logits_ptr, q_ptr, stop, draft_row, token, vocab, v0 + tl.arange(0, BLOCK_V),
                          greedy, t, top, cut, z, amax, use_residual, HAS_Q)
        total += tl.sum(tile, axis=0)
    target = tl.load(uniforms_ptr + last) * total
    below = tl.zeros([], dtype=tl.int64)
    running = tl.zeros([], dtype=tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.zeros([], dtype=tl.int64)
    for v0 in range(0, vocab, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        tile = _dist_tile(logits_ptr, q_ptr, stop, draft_row, token, vocab, offs,
                          greedy, t, top, cut, z, amax, use_residual, HAS_Q)
        cdf = running + tl.cumsum(tile, axis=0)
        below += tl.sum(((offs < vocab) & (cdf <= target)).to(tl.int64), axis=0)
        running += tl.sum(tile, axis=0)
        tile = tl.where(offs < vocab, tile, float("-inf"))
        best_idx = tl.where(tl.max(tile, axis=0) > best, v0 + tl.argmax(tile, axis=0).to(tl.int64), best_idx)
        best = tl.maximum(best, tl.max(tile, axis=0))
    idx = tl.minimum(below, vocab - 1)
    landed = _dist_tile(logits_ptr, q_ptr, stop, draft_row, token, vocab, idx, greedy, t, top, cut, z, amax,
                        use_residual, HAS_Q)
    idx = tl.where(landed <= 0.0, best_idx, idx)  # a zero-probability landing (rounding) falls back to argmax
    tl.store(next_token_ptr + r, idx)


def dspark_verify_triton(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    row_offsets: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    block_v: int = MAX_BLOCK_V,
) -> VerifyResult:
    """`dspark_verify` (same arguments, same result) as one Triton kernel launch over the R requests.

    block_v: the widest vocabulary tile (a power of two); a smaller vocabulary is one tile of its own size.
    """
    n_rows, vocab = target_logits.shape
    n_req = row_offsets.numel() - 1
    counts = row_offsets[1:] - row_offsets[:-1]
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if n_req and int(counts.min()) < 1:
        raise ValueError("every request needs at least its anchor row")
    if draft_tokens.numel() != n_rows - n_req:
        raise ValueError(f"{draft_tokens.numel()} draft tokens for {n_rows} rows of {n_req} requests")
    if uniforms.numel() != n_rows:
        raise ValueError(f"{uniforms.numel()} uniforms for {n_rows} rows")
    device = target_logits.device
    accepted = torch.empty(n_req, dtype=torch.long, device=device)
    next_token = torch.empty(n_req, dtype=torch.long, device=device)
    if n_req == 0:
        return VerifyResult(accepted=accepted, next_token=next_token)
    logits = target_logits.float().contiguous()
    has_q = draft_probs is not None
    q = draft_probs.float().contiguous() if has_q else logits  # unread when drafting was greedy
    dspark_verify_kernel[(n_req,)](
        logits, draft_tokens.long().contiguous(), q, row_offsets.long().contiguous(),
        temperature.float().contiguous(), top_k.long().contiguous(), top_p.float().contiguous(),
        uniforms.float().contiguous(),  # compared in float32, as the reference does
        accepted, next_token, vocab,
        HAS_Q=has_q, BLOCK_V=min(triton.next_power_of_2(vocab), block_v),
        GREEDY_T=GREEDY_TEMPERATURE, FLOOR=RESIDUAL_FLOOR,
    )
    return VerifyResult(accepted=accepted, next_token=next_token)
