"""The Triton DSparkVerify kernel against the torch reference, under TRITON_INTERPRET=1 on CPU, or compiled for
a GPU with DSPARK_TRITON_DEVICE=cuda (the reference still runs on the CPU).

Given the same uniforms both must give identical accepted counts and next tokens. Uniforms are kept
away from decision boundaries (acceptance ratios, CDF steps) so float32 rounding differences between
the two implementations cannot flip a comparison: a case is used only if the reference gives the same
result with every uniform shifted by ±EPS.
"""
import os

DEVICE = os.environ.get("DSPARK_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from dspark_trt.spec.verify import dspark_verify

triton = pytest.importorskip("triton", reason="triton cannot be imported")
from dspark_trt_plugins.triton_kernel import dspark_verify_triton as _kernel  # noqa: E402

if DEVICE != "cpu" and not torch.cuda.is_available():
    pytest.skip(f"DSPARK_TRITON_DEVICE={DEVICE} but torch sees no GPU", allow_module_level=True)


def dspark_verify_triton(**inputs):
    """The kernel on DEVICE, its result back on the CPU beside the reference's."""
    moved = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    result = _kernel(**moved)
    return type(result)(accepted=result.accepted.cpu(), next_token=result.next_token.cpu())

EPS = 1e-5  # well above float32 cumsum rounding over V <= 1000, rarely hit by chance


def _case(seed: int, vocab: int, counts: list[int], with_q: bool):
    """Random inputs whose drafts are often accepted: drafts drawn from q, greedy drafts often argmax."""
    g = torch.Generator().manual_seed(seed)
    n_req, n_rows = len(counts), sum(counts)
    row_offsets = torch.tensor([0] + counts).cumsum(0)
    logits = torch.randn(n_rows, vocab, generator=g) * 2
    # cycles of coprime lengths mix greedy, sharp and flat (T=3: tail tokens get drawn) rows with top-k/top-p
    temperature = torch.tensor([[0.0, 0.7, 0.0, 1.5, 3.0][r % 5] for r in range(n_req)])
    top_k = torch.tensor([[0, 5, 40, 0, 3, 12][r % 6] for r in range(n_req)])
    top_p = torch.tensor([[1.0, 1.0, 0.9, 0.7, 0.5, 0.8, 1.0][(r + seed) % 7] for r in range(n_req)])
    # the draft for target row j mimics that row (noisy logits), so acceptance runs of several tokens occur
    is_last = torch.zeros(n_rows, dtype=torch.bool)
    is_last[row_offsets[1:] - 1] = True
    draft_logits = logits[~is_last] + 0.5 * torch.randn(n_rows - n_req, vocab, generator=g)
    q = torch.softmax(draft_logits, dim=-1)
    sampled = torch.multinomial(q, 1, generator=g).squeeze(1)
    draft_tokens = sampled if with_q else draft_logits.argmax(dim=-1)
    return dict(target_logits=logits, draft_tokens=draft_tokens, draft_probs=q if with_q else None,
                row_offsets=row_offsets, temperature=temperature, top_k=top_k, top_p=top_p), g


def _stable_uniforms(inputs, g: torch.Generator):
    """Uniforms for which the reference's answer does not change within ±EPS."""
    for _ in range(50):
        u = torch.rand(inputs["target_logits"].shape[0], generator=g, dtype=torch.float64) * (1 - 2 * EPS) + EPS
        results = [dspark_verify(**inputs, uniforms=u + d) for d in (-EPS, 0.0, EPS)]
        if all(torch.equal(r.accepted, results[1].accepted) and torch.equal(r.next_token, results[1].next_token)
               for r in results):
            return u, results[1]
    pytest.fail("no boundary-free uniforms found")


@pytest.mark.parametrize("seed,vocab,counts,with_q", [
    (0, 64, [1], False),
    (1, 97, [3, 1, 5, 2], False),
    (2, 128, [4, 1, 3], True),
    (3, 300, [2, 6, 1, 3, 4, 1], True),
    (4, 200, [5, 5], True),
    (7, 96, [1, 2, 3, 4] * 4, True),  # many draws: top-k/top-p edges and residuals actually get hit
    (8, 96, [1, 2, 3, 4] * 4, False),
])
def test_matches_reference(seed, vocab, counts, with_q):
    inputs, g = _case(seed, vocab, counts, with_q)
    u, expected = _stable_uniforms(inputs, g)
    got = dspark_verify_triton(**inputs, uniforms=u)
    assert torch.equal(got.accepted, expected.accepted)
    assert torch.equal(got.next_token, expected.next_token)


@pytest.mark.parametrize("seed,with_q", [(9, True), (10, False)])
def test_vocabulary_tiles_match_reference(seed, with_q):
    """V=1000 in 256-wide tiles: max/argmax, the top-k/top-p cuts, the sums and the CDF search all cross
    tiles (the mixed requests cover greedy and T>0 with and without top-k/top-p)."""
    inputs, g = _case(seed, 1000, [1, 2, 3, 4] * 3, with_q)
    u, expected = _stable_uniforms(inputs, g)
    got = dspark_verify_triton(**inputs, uniforms=u, block_v=256)
    assert torch.equal(got.accepted, expected.accepted)
    assert torch.equal(got.next_token, expected.next_token)
    assert (expected.next_token >= 256).any()  # some draws land beyond the first tile


def test_acceptance_runs_and_rejections_both_exercised():
    """Across a few uniform draws the cases above must include partial and full acceptance."""
    inputs, g = _case(5, 80, [4, 4, 4, 4], True)
    seen = set()
    for _ in range(3):
        u, expected = _stable_uniforms(inputs, g)
        got = dspark_verify_triton(**inputs, uniforms=u)
        assert torch.equal(got.accepted, expected.accepted)
        assert torch.equal(got.next_token, expected.next_token)
        seen |= set(got.accepted.tolist())
    assert 0 in seen and len(seen) >= 2


def test_bad_shapes_are_named():
    inputs, _ = _case(6, 64, [2, 3], False)
    n_rows = inputs["target_logits"].shape[0]
    with pytest.raises(ValueError, match="draft tokens"):
        dspark_verify_triton(**{**inputs, "draft_tokens": inputs["draft_tokens"][:-1]},
                             uniforms=torch.rand(n_rows))
    with pytest.raises(ValueError, match="uniforms"):
        dspark_verify_triton(**inputs, uniforms=torch.rand(n_rows - 1))
    with pytest.raises(ValueError, match="power of two"):
        dspark_verify_triton(**inputs, uniforms=torch.rand(n_rows), block_v=100)
    with pytest.raises(ValueError, match="anchor row"):
        dspark_verify_triton(**{**inputs, "row_offsets": torch.tensor([0, 0, 5])}, uniforms=torch.rand(n_rows))
