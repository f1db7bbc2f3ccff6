"""DSparkVerify: the one semantics of lossless verification (torch reference).

Every other implementation (Triton kernel, TensorRT plugin, ONNX Runtime op) is tested against
`dspark_verify`. Request r owns the target rows row_offsets[r] .. row_offsets[r+1]-1: the anchor row
and one row per draft token it verifies (ℓ_r = rows - 1, possibly 0). Its draft tokens and their
draft distributions q sit at draft offsets row_offsets[r]-r onwards.

Rule (speculative sampling): p_j = warp(target row j); accept draft j iff u_j < min(1, p_j(d_j) /
q_j(d_j)); `accepted` = the leading run of accepts. At the first rejection the next token is drawn
from normalize(max(0, p - q)) (p itself if that mass is ~0); if all ℓ_r pass, the bonus token is
drawn from p_ℓ. Greedy requests get one-hot p (warp_probs) and one-hot q, so the same rule gives
"accept while draft == target argmax, then the target's argmax". All math is float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_trt.spec.sampling import is_greedy, sample_from_uniform, warp_probs

RESIDUAL_FLOOR = 1e-8


@dataclass
class VerifyResult:
    accepted: torch.Tensor  # [R] long: accepted draft tokens per request
    next_token: torch.Tensor  # [R] long: the correction (first rejection) or bonus token


def dspark_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    row_offsets: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> VerifyResult:
    """Verify every request's draft prefix against its target rows (see the module docstring).

    target_logits [N_rows, V]; draft_tokens [N_rows - R]; draft_probs [N_rows - R, V] or None (then q
    is the one-hot of each draft token, i.e. greedy drafting); row_offsets [R+1]; per-request
    temperature/top_k/top_p [R]; uniforms [N_rows]: row j < ℓ_r of a request holds the acceptance
    uniform of draft j, its last row the uniform that draws the next token.
    """
    n_rows, vocab = target_logits.shape
    n_req = row_offsets.numel() - 1
    counts = row_offsets[1:] - row_offsets[:-1]
    if n_req and int(counts.min()) < 1:
        raise ValueError("every request needs at least its anchor row")
    if draft_tokens.numel() != n_rows - n_req:
        raise ValueError(f"{draft_tokens.numel()} draft tokens for {n_rows} rows of {n_req} requests")
    greedy = is_greedy(temperature)
    if bool(greedy.all()):
        return greedy_verdict(target_logits.argmax(dim=-1), draft_tokens, row_offsets)
    if bool(greedy.any()):
        return _greedy_apart(target_logits, draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p,
                             uniforms, greedy)
    request_of_row = torch.repeat_interleave(torch.arange(n_req), counts)
    p = warp_probs(target_logits, temperature[request_of_row], top_k[request_of_row], top_p[request_of_row])

    # rows that verify a draft token: all but the last row of each request
    is_last = torch.zeros(n_rows, dtype=torch.bool)
    is_last[row_offsets[1:] - 1] = True
    draft_rows = (~is_last).nonzero().squeeze(1)
    if draft_probs is None:
        q = torch.zeros(draft_tokens.numel(), vocab)
        q.scatter_(1, draft_tokens.unsqueeze(1), 1.0)
    else:
        q = draft_probs.float()
    p_d = p[draft_rows].gather(1, draft_tokens.unsqueeze(1)).squeeze(1)
    q_d = q.gather(1, draft_tokens.unsqueeze(1)).squeeze(1)
    ratio = torch.clamp(p_d / q_d.clamp(min=RESIDUAL_FLOOR), max=1.0)
    accept_row = torch.zeros(n_rows, dtype=torch.bool)
    accept_row[draft_rows] = uniforms[draft_rows].to(ratio.dtype) < ratio

    # accepted = distance from a request's first row to its first non-accepted row; the last row is
    # never "accepted", so a fully accepted prefix stops there and draws the bonus token
    row_index = torch.arange(n_rows)
    stop_at = torch.where(accept_row, torch.full_like(row_index, n_rows), row_index)
    stop_row = torch.full((n_req,), n_rows, dtype=torch.long).scatter_reduce(0, request_of_row, stop_at, "amin")
    accepted = stop_row - row_offsets[:-1]
    dist = p[stop_row].clone()
    rejected_req = accepted < counts - 1
    if bool(rejected_req.any()):
        idx = rejected_req.nonzero().squeeze(1)
        q_rows = q[stop_row[idx] - idx]  # draft row index = target row index - request index
        residual = torch.clamp(dist[idx] - q_rows, min=0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        dist[idx] = torch.where(mass > RESIDUAL_FLOOR, residual, dist[idx])
    last_rows = row_offsets[1:] - 1
    next_token = sample_from_uniform(dist, uniforms[last_rows])
    return VerifyResult(accepted=accepted, next_token=next_token)


def _greedy_apart(target_logits, draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p, uniforms,
                  greedy: torch.Tensor) -> VerifyResult:
    """A batch mixing greedy and sampled requests: the greedy ones by `greedy_verdict` (the rule's own outcome
    for them, from the argmax alone), the rest by the rule, so that no [N, V] distribution is built for greedy
    rows (of a 48-request batch with a quarter sampled, that was a tenth of the pass)."""
    counts = row_offsets[1:] - row_offsets[:-1]
    request_ids = torch.arange(counts.numel())
    request_of_row = torch.repeat_interleave(request_ids, counts)
    request_of_draft = torch.repeat_interleave(request_ids, counts - 1)  # a request's rows: its drafts, then one
    accepted = torch.zeros(counts.numel(), dtype=torch.long)
    next_token = torch.zeros(counts.numel(), dtype=torch.long)
    for part, is_greedy_part in ((greedy, True), (~greedy, False)):
        requests, rows, drafts = part.nonzero().squeeze(1), part[request_of_row], part[request_of_draft]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts[requests].cumsum(0)])
        if is_greedy_part:
            verdict = greedy_verdict(target_logits[rows].argmax(dim=-1), draft_tokens[drafts], offsets)
        else:
            verdict = dspark_verify(target_logits[rows], draft_tokens[drafts],
                                    None if draft_probs is None else draft_probs[drafts], offsets,
                                    temperature[requests], top_k[requests], top_p[requests], uniforms[rows])
        accepted[requests], next_token[requests] = verdict.accepted, verdict.next_token
    return VerifyResult(accepted=accepted, next_token=next_token)


def greedy_verdict(argmax: torch.Tensor, draft_tokens: torch.Tensor, row_offsets: torch.Tensor) -> VerifyResult:
    """The rule above when every request is greedy, from each target row's argmax alone (argmax [N_rows]).

    p is the one-hot of the row's argmax a, so p(d)/q(d) is 0 for d != a and >= 1 for d = a, whatever q is
    (q(d) > 0: d was drawn from it): accept while the draft is the argmax; the residual max(0, p - q) is zero
    but at a, so the next token is the stopping row's argmax. No [N, V] distribution is built.
    """
    if draft_tokens.numel() == 0:  # plain decoding: every request has one row, its argmax is the token
        return VerifyResult(accepted=torch.zeros(row_offsets.numel() - 1, dtype=torch.long),
                            next_token=argmax[row_offsets[1:] - 1])
    n_rows = argmax.numel()
    counts = row_offsets[1:] - row_offsets[:-1]
    request_of_row = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    is_last = torch.zeros(n_rows, dtype=torch.bool)
    is_last[row_offsets[1:] - 1] = True
    accept_row = torch.zeros(n_rows, dtype=torch.bool)
    accept_row[~is_last] = argmax[~is_last] == draft_tokens
    row_index = torch.arange(n_rows)
    stop_at = torch.where(accept_row, torch.full_like(row_index, n_rows), row_index)
    stop_row = torch.full((counts.numel(),), n_rows, dtype=torch.long).scatter_reduce(
        0, request_of_row, stop_at, "amin")
    return VerifyResult(accepted=stop_row - row_offsets[:-1], next_token=argmax[stop_row])
