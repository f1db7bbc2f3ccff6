"""warp_probs' top-k / top-p masks (spec/sampling.py sorts only the best candidates) against the definition: sort
the whole row, keep the top k, then the smallest prefix whose mass reaches top p (the top token always; top p 1
is off)."""
import pytest
import torch

from dspark_trt.spec import sampling
from dspark_trt.spec.sampling import warp_probs


def full_sort_mask(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).unsqueeze(1)
    drop = rank >= k
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter(1, order, drop)


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])  # flat rows (nuclei past the partial sort) to peaked ones
def test_partial_sort_keeps_the_tokens_a_full_sort_keeps(spread):
    generator = torch.Generator().manual_seed(int(spread * 10))
    rows, vocab = 24, 5000
    logits = torch.randn(rows, vocab, generator=generator) * spread
    top_k = torch.tensor([0, 1, 3, 40, 2000, 5000, 9999, 0] * 3)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 0.99, 1.0, 0.3, 0.999] * 3)
    for rows_taken in (slice(None), slice(0, 1), slice(2, 4), slice(7, 8)):  # mixed batches and single rows
        l, k, p = logits[rows_taken], top_k[rows_taken], top_p[rows_taken]
        kept = warp_probs(l, 1.0, k, p) > 0
        assert torch.equal(kept, ~full_sort_mask(l, k, p))
        assert torch.equal(warp_probs(l, 1.0, k, p), torch.softmax(l.masked_fill(~kept, float("-inf")), dim=-1))


def test_a_nucleus_beyond_the_partial_sort_falls_back_to_its_whole_row(monkeypatch):
    calls = []
    real = sampling._kept
    monkeypatch.setattr(sampling, "_kept", lambda *a: calls.append((a[0].shape[0], a[-1])) or real(*a))
    flat = torch.zeros(3, 3000)
    flat[:, :5] = 1.0
    flat[1, 7] = 30.0  # a peaked row between two flat ones
    top_k, top_p = torch.tensor([0, 0, 0]), torch.tensor([0.9, 0.9, 0.95])
    kept = warp_probs(flat, 1.0, top_k, top_p) > 0
    # tied logits: which of them a sort puts first is its own choice, how many are kept is not
    assert torch.equal(kept.sum(-1), (~full_sort_mask(flat, top_k, top_p)).sum(-1)) and bool(kept[[0, 2], :5].all())
    assert int(kept[0].sum()) > sampling.PARTIAL_SORT_WIDTH and int(kept[1].sum()) == 1
    assert calls == [(3, sampling.PARTIAL_SORT_WIDTH), (2, 3000)]  # the flat rows alone, sorted whole
    calls.clear()
    assert (warp_probs(flat, 1.0, 0, 0.0005) > 0).sum(-1).tolist() == [1, 1, 1]  # the top token alone: no fallback
    assert calls == [(3, sampling.PARTIAL_SORT_WIDTH)]
