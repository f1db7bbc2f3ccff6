"""DSparkVerify: greedy semantics, batching, and statistical losslessness (chi-square on tiny vocabularies).

Every trial is one request of a big ragged batch, so one `dspark_verify` call runs thousands of trials.
"""
import pytest
import torch

from dspark_trt.spec.cost_table import CostTable
from dspark_trt.spec.sampling import sample_from_uniform, warp_probs
from dspark_trt.spec.scheduler import AsyncTopKScheduler, schedule_dspark
from dspark_trt.spec.verify import dspark_verify

V, GAMMA, TRIALS = 5, 3, 20000


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of observed counts under probs (Pearson); cells expecting < 5 are pooled into one."""
    counts, probs = counts.double().reshape(-1), probs.double().reshape(-1)
    assert counts[probs == 0].sum() == 0, "a token of zero target probability was produced"
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def ragged(n_req: int, rows_each: int) -> torch.Tensor:
    return torch.arange(n_req + 1) * rows_each


def params(n: int, temperature: float, top_k: int, top_p: float):
    return torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.long), torch.full((n,), top_p)


# ---------------------------------------------------------------- greedy and batching

def test_greedy_accepts_while_draft_is_target_argmax_then_takes_target_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 6, generator=g)
    top = logits.argmax(-1)
    # request 0: rows 0..3, drafts [top0, top1, wrong] -> 2 accepted, next = argmax of row 2 (correction)
    # request 1: rows 4..5, drafts [top4] -> 1 accepted, next = argmax of row 5 (bonus)
    # request 2: row 6 only -> 0 accepted, next = argmax of row 6
    wrong = (top[2] + 1) % 6
    drafts = torch.stack([top[0], top[1], wrong, top[4]])
    offsets = torch.tensor([0, 4, 6, 7])
    one_hot = torch.nn.functional.one_hot(drafts, 6).float()
    for draft_probs in (None, one_hot):
        for seed in range(3):  # greedy results do not depend on the uniforms
            u = torch.rand(7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            res = dspark_verify(logits, drafts, draft_probs, offsets, *params(3, 0.0, 0, 1.0), u)
            assert res.accepted.tolist() == [2, 1, 0]
            assert res.next_token.tolist() == [int(top[2]), int(top[5]), int(top[6])]


def test_greedy_shortcut_equals_the_general_rule_on_random_batches(monkeypatch):
    """All-greedy passes take a shortcut (no [N, V] distributions); it must give what the general rule gives,
    with one-hot drafts and with drafts drawn from a spread q, including ties between equal logits, and with no
    drafts at all."""
    g = torch.Generator().manual_seed(1)
    for trial in range(50):
        counts = torch.randint(1, 6, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        if trial < 5:  # plain decoding: no drafts at all
            counts = torch.ones_like(counts)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        n_rows, n_req = int(offsets[-1]), counts.numel()
        logits = torch.randint(0, 3, (n_rows, 4), generator=g).float()  # many ties
        drafts = torch.where(torch.rand(n_rows - n_req, generator=g) < 0.7, logits.argmax(-1)[:n_rows - n_req],
                             torch.randint(0, 4, (n_rows - n_req,), generator=g))
        u = torch.rand(n_rows, generator=g, dtype=torch.float64)
        fast = dspark_verify(logits, drafts, None, offsets, *params(n_req, 0.0, 0, 1.0), u)
        spread = torch.softmax(torch.randn(n_rows - n_req, 4, generator=g), -1)
        with monkeypatch.context() as patch:  # the shortcut's test never passes: the general rule runs, and
            patch.setattr("dspark_trt.spec.verify.is_greedy", lambda t: t < -1.0)  # warp_probs keeps T = 0 one-hot
            general = [dspark_verify(logits, drafts, q, offsets, *params(n_req, 0.0, 0, 1.0), u)
                       for q in (torch.nn.functional.one_hot(drafts, 4).float(), spread)]
        for result in general:
            assert torch.equal(fast.accepted, result.accepted) and torch.equal(fast.next_token, result.next_token)


def test_mixed_greedy_and_sampled_batch_equals_each_request_alone():
    g = torch.Generator().manual_seed(1)
    lengths = [3, 0, 2, 1]
    temps, top_k, top_p = torch.tensor([0.0, 1.0, 0.7, 0.0]), torch.tensor([0, 3, 0, 0]), torch.tensor([1.0, 0.9, 0.8, 1.0])
    offsets = torch.tensor([0, *torch.tensor(lengths).add(1).cumsum(0).tolist()])
    logits = torch.randn(int(offsets[-1]), V, generator=g)
    draft_logits = torch.randn(sum(lengths), V, generator=g)
    req_of_draft = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    q = warp_probs(draft_logits, temps[req_of_draft], top_k[req_of_draft], top_p[req_of_draft])
    drafts = sample_from_uniform(q, torch.rand(sum(lengths), generator=g, dtype=torch.float64))
    for seed in range(20):
        u = torch.rand(int(offsets[-1]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        batch = dspark_verify(logits, drafts, q, offsets, temps, top_k, top_p, u)
        for r in range(4):
            lo, hi, dlo = int(offsets[r]), int(offsets[r + 1]), int(offsets[r]) - r
            alone = dspark_verify(logits[lo:hi], drafts[dlo: dlo + lengths[r]], q[dlo: dlo + lengths[r]],
                                  torch.tensor([0, hi - lo]), temps[r: r + 1], top_k[r: r + 1], top_p[r: r + 1],
                                  u[lo:hi])
            assert (int(batch.accepted[r]), int(batch.next_token[r])) == (int(alone.accepted), int(alone.next_token))
        # the greedy requests (0 and 3) behave as "accept while equal to the argmax"
        for r in (0, 3):
            lo = int(offsets[r])
            top = logits[lo: lo + lengths[r] + 1].argmax(-1)
            d = drafts[lo - r: lo - r + lengths[r]]
            run = int((d == top[: lengths[r]]).long().cumprod(0).sum())
            assert int(batch.accepted[r]) == run and int(batch.next_token[r]) == int(top[run])


# ---------------------------------------------------------------- statistical losslessness

class Chain:
    """Toy target and drafter: logits at each position depend on every token before it."""

    def __init__(self, seed: int, temperature: float, top_k: int, top_p: float):
        g = torch.Generator().manual_seed(seed)
        self.target = [torch.randn(*([V] * k), V, generator=g) * 1.5 for k in range(GAMMA + 1)]
        self.draft = [t + 0.8 * torch.randn(t.shape, generator=g) for t in self.target[:GAMMA]]
        self.warp = (temperature, top_k, top_p)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return warp_probs(logits.reshape(-1, V), *self.warp)

    def first_two_token_probs(self) -> torch.Tensor:
        """P(x1, x2) = p0(x1) · p1(x2 | x1), [V, V]."""
        return self.probs(self.target[0]).reshape(V, 1) * self.probs(self.target[1])


def simulate(chain: Chain, verify=dspark_verify, n: int = TRIALS, seed: int = 0) -> torch.Tensor:
    """Run one speculative round with γ drafts per trial (plus a plain round when needed for a second token).

    Returns the counts of the first two output tokens, [V, V].
    """
    g = torch.Generator().manual_seed(seed)
    drafts = torch.zeros(n, GAMMA, dtype=torch.long)
    q = torch.zeros(n, GAMMA, V)
    for j in range(GAMMA):
        q[:, j] = chain.probs(chain.draft[j][tuple(drafts[:, :j].T)])
        drafts[:, j] = sample_from_uniform(q[:, j], torch.rand(n, generator=g, dtype=torch.float64))
    rows = torch.stack([chain.target[j][tuple(drafts[:, :j].T)].expand(n, V) for j in range(GAMMA + 1)], dim=1)
    u = torch.rand(n * (GAMMA + 1), generator=g, dtype=torch.float64)
    res = verify(rows.reshape(-1, V), drafts.reshape(-1), q.reshape(-1, V), ragged(n, GAMMA + 1),
                 *params(n, *chain.warp), u)
    out = torch.cat([drafts, torch.zeros(n, 1, dtype=torch.long)], dim=1)
    out[torch.arange(n), res.accepted] = res.next_token
    # a rejection at draft 0 leaves one token: the next round (anchor only) draws the second from p1(. | x1)
    short = res.accepted == 0
    m = int(short.sum())
    nxt = verify(chain.target[1][out[short, 0]], torch.zeros(0, dtype=torch.long), torch.zeros(0, V),
                 ragged(m, 1), *params(m, *chain.warp), torch.rand(m, generator=g, dtype=torch.float64))
    out[short, 1] = nxt.next_token
    return torch.bincount(out[:, 0] * V + out[:, 1], minlength=V * V).reshape(V, V)


WARPS = [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (0.8, 4, 0.9)]


@pytest.mark.parametrize("warp", WARPS)
def test_first_two_tokens_follow_the_target_distribution(warp):
    chain = Chain(seed=3, temperature=warp[0], top_k=warp[1], top_p=warp[2])
    counts = simulate(chain)
    expected = chain.first_two_token_probs()
    assert chi2_pvalue(counts.sum(1), expected.sum(1)) > 1e-3  # first token alone
    assert chi2_pvalue(counts, expected) > 1e-3  # first two jointly


def biased_acceptance(*args):
    """Accepts with min(1, p/q) + 0.2: the acceptance uniforms are shifted down by 0.2."""
    logits, drafts, q, offsets, t, k, p, u = args
    u = u.clone()
    draft_rows = torch.ones(u.numel(), dtype=torch.bool)
    draft_rows[offsets[1:] - 1] = False
    u[draft_rows] = (u[draft_rows] - 0.2).clamp(min=0)
    return dspark_verify(logits, drafts, q, offsets, t, k, p, u)


def resample_from_target(*args):
    """After a rejection draws from p instead of the residual max(0, p - q)."""
    logits, drafts, q, offsets, t, k, p, u = args
    res = dspark_verify(*args)
    rejected = res.accepted < offsets[1:] - offsets[:-1] - 1
    stop_rows = offsets[:-1] + res.accepted
    plain = sample_from_uniform(warp_probs(logits[stop_rows], t, k, p), u[offsets[1:] - 1])
    res.next_token = torch.where(rejected, plain, res.next_token)
    return res


@pytest.mark.parametrize("biased", [biased_acceptance, resample_from_target])
def test_biased_verifiers_fail_the_same_test(biased):
    chain = Chain(seed=3, temperature=1.0, top_k=0, top_p=1.0)
    counts = simulate(chain, verify=biased)
    assert chi2_pvalue(counts.sum(1), chain.first_two_token_probs().sum(1)) < 1e-6


# ---------------------------------------------------------------- Appendix A: the early break

def test_appendix_a_non_causal_scheduler_is_biased_and_early_break_is_not():
    # vocabulary {A=0, B=1}; p_t = (0.7, 0.3), p_d = (0.5, 0.5); a1 = 0.8; c2 = 0.9 after A, 0 after B
    table = CostTable([1, 2, 3], [1.0, 0.5, 0.45])
    target = torch.log(torch.tensor([0.7, 0.3]))
    p_d = torch.tensor([0.5, 0.5])
    conf = {0: torch.tensor([[0.8, 0.9]]), 1: torch.tensor([[0.8, 0.0]])}
    max_len = torch.tensor([2])
    # non-causal: the global search (no break) run on the current step's confidences, which see x1
    search = AsyncTopKScheduler(table, min_predicted_gain=0)
    non_causal = {x: search.capacity(conf[x], max_len) for x in (0, 1)}
    causal = {x: int(schedule_dspark(conf[x], table, max_len, min_predicted_gain=0)[0]) for x in (0, 1)}
    assert non_causal == {0: 2, 1: 0} and causal == {0: 0, 1: 0}

    g = torch.Generator().manual_seed(7)
    n = TRIALS
    x = sample_from_uniform(p_d.expand(n, 2), torch.rand(n, generator=g, dtype=torch.float64))
    drafts = torch.stack([x, sample_from_uniform(p_d.expand(n, 2), torch.rand(n, generator=g))], dim=1)
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    for schedule, p_a in ((non_causal, 0.85), (causal, 0.7)):
        ell = torch.tensor([schedule[int(t)] for t in (0, 1)])[x]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), (ell + 1).cumsum(0)])
        keep = torch.arange(2) < ell.unsqueeze(1)
        rows = target.expand(int(offsets[-1]), 2)
        uniforms = u[torch.cat([keep, torch.ones(n, 1, dtype=torch.bool)], dim=1)]  # drafts' then the last row's
        res = dspark_verify(rows, drafts[keep], p_d.expand(int(keep.sum()), 2), offsets, *params(n, 1.0, 0, 1.0),
                            uniforms)
        first = torch.where(res.accepted > 0, x, res.next_token)
        assert float((first == 0).double().mean()) == pytest.approx(p_a, abs=0.015)
    # the causal run also passes the goodness-of-fit test against p_t
    assert chi2_pvalue(torch.bincount(first, minlength=2), torch.tensor([0.7, 0.3])) > 1e-3
