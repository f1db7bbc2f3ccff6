"""Turning logits into the distribution a token is drawn from, and drawing it.

One definition is shared by the drafter (which samples draft tokens from q) and the verifier (which
compares the target's p against the very same q), so top-k/top-p/temperature are applied to both
distributions consistently. Randomness enters only as uniform numbers in [0, 1): every sampler is
an inverse-CDF lookup, which makes runs reproducible from a per-request seed and lets kernels
(Triton, TensorRT, ONNX Runtime) take the same uniforms as inputs and give the same tokens.
"""
from __future__ import annotations

import torch

GREEDY_TEMPERATURE = 1e-5  # below this a temperature means greedy (argmax), as in the reference
PARTIAL_SORT_WIDTH = 1024  # candidates sorted for a row with top-p alone before its whole row is


def is_greedy(temperature):
    """Whether a temperature (a number, or a tensor or array of them) means greedy decoding: the one place the
    threshold is applied (the Triton kernel, which cannot call Python, takes GREEDY_TEMPERATURE as a constant)."""
    return temperature < GREEDY_TEMPERATURE


def warp_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor | float = 1.0,
    top_k: torch.Tensor | int = 0,
    top_p: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Per-row sampling distribution [N, V] (float32) from logits [N, V].

    Order: temperature, then top-k (0 = off), then top-p (1.0 = off), renormalised. A row whose
    temperature is below GREEDY_TEMPERATURE becomes the one-hot of its argmax. Parameters are
    scalars or one value per row.
    """
    logits = logits.float()
    n, vocab = logits.shape
    temperature = torch.as_tensor(temperature, dtype=torch.float32).expand(n).reshape(n, 1)
    top_k = torch.as_tensor(top_k, dtype=torch.long).expand(n)
    top_p = torch.as_tensor(top_p, dtype=torch.float32).expand(n)
    greedy = is_greedy(temperature.squeeze(1))
    scaled = logits / torch.where(greedy.unsqueeze(1), torch.ones_like(temperature), temperature)
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        scaled = _mask_top_k_top_p(scaled, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs)
        one_hot.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    return probs


def _mask_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf; the top token always stays. top_k 0 and
    top_p >= 1 are off (a row is never cut by rounding that makes its mass reach 1).

    Only the best candidates are sorted (`torch.topk`): all k of a top-k row, and for a row with top-p alone
    the first PARTIAL_SORT_WIDTH when they hold its nucleus (else that row is sorted whole).
    A full sort of a 49k vocabulary cost about 20 ms a row on 2 cores, most of a sampled verification pass."""
    vocab = scaled.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    unlimited = (k == vocab) & (top_p >= 1.0)
    width = min(vocab, int(k.clamp(max=PARTIAL_SORT_WIDTH).masked_fill(unlimited, 1).max()))
    keep, decided = _kept(scaled, k, top_p, width)
    if not bool(decided.all()):
        rows = (~decided).nonzero().squeeze(1)
        keep[rows] = _kept(scaled[rows], k[rows], top_p[rows], vocab)[0]
    return scaled.masked_fill(~(keep | unlimited.unsqueeze(1)), float("-inf"))


def _kept(scaled: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kept tokens [N, V], bool; whether each row was decided) from the best `width` of each row: a row
    is not where its nucleus reaches beyond them. A row's probabilities are its top k's softmax; a row
    without top-k (k > width) reads them from its whole row's softmax."""
    top, order = scaled.topk(width, dim=-1)  # descending
    rank = torch.arange(width).expand_as(top)
    drop = rank >= k.unsqueeze(1)
    within = k <= width
    probs = torch.softmax(top.masked_fill(drop, float("-inf")), dim=-1)
    if not bool(within.all()):
        probs = torch.where(within.unsqueeze(1), probs, torch.softmax(scaled, dim=-1).gather(1, order))
    cumulative = probs.cumsum(dim=-1)
    nucleus = top_p < 1.0
    decided = within | (nucleus & (cumulative[:, -1] >= top_p))
    drop |= (cumulative - probs >= top_p.unsqueeze(1)) & nucleus.unsqueeze(1)
    drop[:, 0] = False
    return torch.zeros_like(scaled, dtype=torch.bool).scatter(1, order, ~drop), decided


def sample_from_uniform(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of probs [N, V] by inverse CDF with uniforms [N] in [0, 1).

    Rows need not be normalised (residual distributions are passed unnormalised). Zero-probability
    tokens are never returned.
    """
    cdf = probs.float().cumsum(dim=-1)
    target = uniform.float().reshape(-1, 1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    idx = idx.clamp(max=probs.shape[-1] - 1)
    # guard against landing on a zero-probability token through rounding at the top of the cdf
    bad = probs.gather(1, idx.unsqueeze(1)).squeeze(1) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, probs.argmax(dim=-1), idx)
    return idx


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) of each row [N] under the softmax of its logits [N, V] (float32).

    Given the target's raw logits this is the log-probability a served request returns: the model's own, before
    controls, temperature, top-k and top-p (TensorRT-LLM's LogprobMode.RAW and vLLM's default), so greedy and
    sampled requests report the same numbers for the same tokens.
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens.long().reshape(-1, 1)).squeeze(1)


def uniforms(generator: torch.Generator, n: int) -> torch.Tensor:
    """n uniform numbers in [0, 1) from a request's own generator (float64 for a fine CDF lookup)."""
    return torch.rand(n, generator=generator, dtype=torch.float64)
