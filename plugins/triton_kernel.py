"""DSparkVerify as one fused Triton-language kernel: one program per request.

Each program warps its target rows (temperature, top-k, top-p), runs the acceptance test row by row
until the first rejection, builds the residual (or bonus) distribution and draws the next token by
inverse CDF from the given uniform: the same rule as `dspark_trt.spec.verify.dspark_verify`, which is
the reference it is tested against. Top-k/top-p are sort-free: a token's rank (and the mass ranked
above it) is counted by comparing it against the row in chunks, so the kernel needs no sort. Runs on
CUDA, and on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark_trt.spec.sampling import GREEDY_TEMPERATURE
from dspark_trt.spec.verify import RESIDUAL_FLOOR, VerifyResult

CHUNK = 64  # tokens compared at once in the rank / mass-above counts


@triton.jit
def _scaled_row(logits_ptr, row, vocab, inv_t, offs, mask):
    x = tl.load(logits_ptr + row * vocab + offs, mask=mask, other=float("-inf"))
    return x * inv_t


@triton.jit
def _warp_row(logits_ptr, row, vocab, temperature, top_k, top_p,
              BLOCK_V: tl.constexpr, CHUNK: tl.constexpr, GREEDY_T: tl.constexpr):
    """Warped distribution p of one target row, as a [BLOCK_V] float32 vector (zero past vocab)."""
    offs = tl.arange(0, BLOCK_V)
    valid = offs < vocab
    greedy = temperature < GREEDY_T
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.maximum(temperature, GREEDY_T))
    s = _scaled_row(logits_ptr, row, vocab, inv_t, offs, valid)
    top = tl.max(s, axis=0)
    keep = valid
    if (top_k > 0) | (top_p < 1.0):
        # rank = number of tokens with a strictly larger logit (0 = the top token)
        rank = tl.zeros([BLOCK_V], dtype=tl.int32)
        for j0 in range(0, vocab, CHUNK):
            c_offs = j0 + tl.arange(0, CHUNK)
            sj = _scaled_row(logits_ptr, row, vocab, inv_t, c_offs, c_offs < vocab)
            rank += tl.sum((sj[None, :] > s[:, None]).to(tl.int32), axis=1)
        k = tl.where(top_k > 0, tl.minimum(top_k, vocab), vocab).to(tl.int32)
        keep_k = valid & (rank < k)
        kth = tl.min(tl.where(keep_k, s, float("inf")), axis=0)
        z = tl.sum(tl.where(keep_k, tl.exp(s - top), 0.0), axis=0)
        # mass of the top-k-kept tokens ranked above each token (the nucleus test)
        above = tl.zeros([BLOCK_V], dtype=tl.float32)
        for j0 in range(0, vocab, CHUNK):
            c_offs = j0 + tl.arange(0, CHUNK)
            sj = _scaled_row(logits_ptr, row, vocab, inv_t, c_offs, c_offs < vocab)
            pj = tl.where(sj >= kth, tl.exp(sj - top) / z, 0.0)
            above += tl.sum(tl.where(sj[None, :] > s[:, None], pj[None, :], 0.0), axis=1)
        keep = (keep_k & (above < top_p)) | (valid & (rank == 0))
    e = tl.where(keep, tl.exp(s - top), 0.0)
    probs = e / tl.sum(e, axis=0)
    raw = tl.load(logits_ptr + row * vocab + offs, mask=valid, other=float("-inf"))
    one_hot = tl.where(offs == tl.argmax(raw, axis=0), 1.0, 0.0)
    return tl.where(greedy, one_hot, probs)


@triton.jit
def _draft_q(q_ptr, draft_row, vocab, token, offs, valid, HAS_Q: tl.constexpr):
    """Draft distribution q of one draft row (one-hot of its token when drafting was greedy)."""
    if HAS_Q:
        q = tl.load(q_ptr + draft_row * vocab + offs, mask=valid, other=0.0)
    else:
        q = tl.where(offs == token, 1.0, 0.0)
    return q


@triton.jit
def dspark_verify_kernel(logits_ptr, draft_tokens_ptr, q_ptr, row_offsets_ptr, temperature_ptr,
                         top_k_ptr, top_p_ptr, uniforms_ptr, accepted_ptr, next_token_ptr, vocab,
                         HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
                         GREEDY_T: tl.constexpr, FLOOR: tl.constexpr):
    r = tl.program_id(0)
    start = tl.load(row_offsets_ptr + r)
    last = tl.load(row_offsets_ptr + r + 1) - 1
    temperature = tl.load(temperature_ptr + r)
    top_k = tl.load(top_k_ptr + r)
    top_p = tl.load(top_p_ptr + r)
    offs = tl.arange(0, BLOCK_V)
    valid = offs < vocab

    # acceptance: walk the draft rows until the first rejection; `stop` is where the draw happens
    stop = last
    row = start
    going = row < last
    while going:
        p = _warp_row(logits_ptr, row, vocab, temperature, top_k, top_p, BLOCK_V, CHUNK, GREEDY_T)
        token = tl.load(draft_tokens_ptr + row - r)
        q = _draft_q(q_ptr, row - r, vocab, token, offs, valid, HAS_Q)
        p_d = tl.sum(tl.where(offs == token, p, 0.0), axis=0)
        q_d = tl.sum(tl.where(offs == token, q, 0.0), axis=0)
        ratio = tl.minimum(p_d / tl.maximum(q_d, FLOOR), 1.0)
        accept = tl.load(uniforms_ptr + row) < ratio
        stop = tl.where(accept, stop, row)
        row += 1
        going = accept & (row < last)
    tl.store(accepted_ptr + r, (stop - start).to(tl.int64))

    # the next token: residual max(0, p - q) at a rejection (p if it has no mass), else the bonus p
    dist = _warp_row(logits_ptr, stop, vocab, temperature, top_k, top_p, BLOCK_V, CHUNK, GREEDY_T)
    if stop < last:
        token = tl.load(draft_tokens_ptr + stop - r)
        q = _draft_q(q_ptr, stop - r, vocab, token, offs, valid, HAS_Q)
        residual = tl.maximum(dist - q, 0.0)
        dist = tl.where(tl.sum(residual, axis=0) > FLOOR, residual, dist)
    cdf = tl.cumsum(dist, axis=0)
    target = tl.load(uniforms_ptr + last) * tl.sum(dist, axis=0)
    idx = tl.minimum(tl.sum((valid & (cdf <= target)).to(tl.int32), axis=0), vocab - 1)
    if tl.sum(tl.where(offs == idx, dist, 0.0), axis=0) <= 0.0:
        idx = tl.argmax(dist, axis=0)
    tl.store(next_token_ptr + r, idx.to(tl.int64))


def dspark_verify_triton(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    row_offsets: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> VerifyResult:
    """`dspark_verify` (same arguments, same result) as one Triton kernel launch over the R requests."""
    n_rows, vocab = target_logits.shape
    n_req = row_offsets.numel() - 1
    counts = row_offsets[1:] - row_offsets[:-1]
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
        HAS_Q=has_q, BLOCK_V=triton.next_power_of_2(vocab), CHUNK=CHUNK,
        GREEDY_T=GREEDY_TEMPERATURE, FLOOR=RESIDUAL_FLOOR,
    )
    return VerifyResult(accepted=accepted, next_token=next_token)
