"""Schedulers on hand-computed cases (arithmetic in the comments)."""
import pytest
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.spec.cost_table import CostTable
from dspark_trt.spec.scheduler import (
    AsyncTopKScheduler,
    make_scheduler,
    schedule_dspark,
    schedule_fixed,
    schedule_off,
    schedule_threshold,
    survival,
)


def table(points: dict[int, float], **kw) -> CostTable:
    return CostTable(list(points), list(points.values()), **kw)


APPENDIX_A = table({1: 1.0, 2: 0.5, 3: 0.45})
# two requests: a(r0) = [0.9, 0.45, 0.405], a(r1) = [0.8, 0.64, 0.32]
TWO = torch.tensor([[0.9, 0.5, 0.9], [0.8, 0.8, 0.5]])
TWO_TABLE = table({2: 10.0, 3: 10.0, 4: 9.5, 5: 9.0, 6: 7.0, 7: 6.0, 8: 5.0})
FULL = torch.tensor([3, 3])


def test_survival_is_cumulative_product_masked_by_max_lengths():
    a = survival(TWO, torch.tensor([3, 1]))
    assert torch.allclose(a, torch.tensor([[0.9, 0.45, 0.405], [0.8, 0.0, 0.0]], dtype=torch.float64))


def test_appendix_a_early_break_verifies_nothing():
    # Θ0 = 1·SPS(1) = 1.0; admitting draft 1: E = 1.8, B = 2, Θ1 = 1.8·0.5 = 0.9 < 1.0 -> break, ℓ = 0,
    # whatever c2 is (0.9 would have given Θ2 = (1 + 0.8 + 0.72)·0.45 = 1.134 without the break)
    for c2 in (0.9, 0.0):
        conf = torch.tensor([[0.8, c2]])
        assert schedule_dspark(conf, APPENDIX_A, torch.tensor([2]), min_predicted_gain=0).tolist() == [0]


def test_global_search_without_break_would_depend_on_the_second_confidence():
    # the capacity search (no break) is what Appendix A warns about if applied to the current step:
    # c2 = 0.9 -> Θ = [1.0, 0.9, 1.134] -> K = 2;  c2 = 0 -> Θ = [1.0, 0.9, 0.81] -> K = 0
    sched = AsyncTopKScheduler(APPENDIX_A, min_predicted_gain=0)
    assert sched.capacity(torch.tensor([[0.8, 0.9]]), torch.tensor([2])) == 2
    assert sched.capacity(torch.tensor([[0.8, 0.0]]), torch.tensor([2])) == 0


def test_dspark_interleaves_requests_by_global_survival_order():
    # ranked: (0,0) .9, (1,0) .8, (1,1) .64, (0,1) .45, (0,2) .405, (1,2) .32
    # Θ0 = 2·10 = 20; (0,0): 2.9·SPS(3)=29; (1,0): 3.7·9.5=35.15; (1,1): 4.34·9=39.06;
    # (0,1): 4.79·SPS(6)=4.79·7=33.53 < 39.06 -> break.  ℓ = [1, 2]: request 1 goes deeper than 0
    assert schedule_dspark(TWO, TWO_TABLE, FULL, min_predicted_gain=0).tolist() == [1, 2]


def test_dspark_respects_max_lengths():
    # request 1 may verify at most 1 draft: ranked (0,0) .9, (1,0) .8, (0,1) .45, (0,2) .405
    # Θ: 20 -> 29 -> 35.15 -> (0,1): 4.15·SPS(5)=37.35 -> (0,2): 4.555·SPS(6)=31.9 break.  ℓ = [2, 1]
    assert schedule_dspark(TWO, TWO_TABLE, torch.tensor([3, 1]), min_predicted_gain=0).tolist() == [2, 1]


def test_dspark_early_break_stops_at_a_local_cliff_that_global_search_passes():
    # one request, c = [0.6, 0.9, 0.9]: a = [0.6, 0.54, 0.486]; SPS = 1, then 0.6 flat
    # Θ0 = 1; Θ1 = 1.6·0.6 = 0.96 -> break, ℓ = 0.
    # Global: Θ2 = 2.14·0.6 = 1.284, Θ3 = 2.626·0.6 = 1.5756 -> K = 3
    cliff = table({1: 1.0, 2: 0.6, 4: 0.6})
    conf, ml = torch.tensor([[0.6, 0.9, 0.9]]), torch.tensor([3])
    assert schedule_dspark(conf, cliff, ml, min_predicted_gain=0).tolist() == [0]
    assert AsyncTopKScheduler(cliff, min_predicted_gain=0).capacity(conf, ml) == 3


def test_min_predicted_gain_switches_speculation_off_when_the_gain_is_small():
    flat = table({1: 1.0, 8: 1.0})
    ml = torch.tensor([3])
    # c0 = 0.03: Θ1 = 1.03 > Θ0 = 1 so Algorithm 1 admits it, but 3% < 4% predicted gain -> nothing
    low = torch.tensor([[0.03, 1.0, 1.0]])
    assert schedule_dspark(low, flat, ml, min_predicted_gain=0).tolist() == [3]
    assert schedule_dspark(low, flat, ml, min_predicted_gain=0.04).tolist() == [0]
    # c0 = 0.05 clears 4% (position-0 gate: 1.05 >= 1.04)
    assert schedule_dspark(torch.tensor([[0.05, 1.0, 1.0]]), flat, ml, 0.04).tolist() == [3]


def test_async_uses_capacity_from_two_steps_earlier_and_fresh_ranking():
    sched = AsyncTopKScheduler(TWO_TABLE, min_predicted_gain=0)
    # steps 1 and 2: no history yet -> K = 0; step 1's confidences give K = 3 (Θ peaks at 39.06 above)
    assert sched(TWO, FULL).tolist() == [0, 0]
    weak = torch.tensor([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])  # step 2: Θ = 20, 2.1·10=21, 2.2·9.5=20.9 -> K = 1
    assert sched(weak, FULL).tolist() == [0, 0]
    # step 3 uses K = 3 with fresh confidences: a(r0) = [0.5, 0.45, 0.405], a(r1) = [0.95, 0.9025, 0.857]
    fresh = torch.tensor([[0.5, 0.9, 0.9], [0.95, 0.95, 0.95]])
    assert sched(fresh, FULL).tolist() == [0, 3]
    # step 4 uses step 2's K = 1: the single best candidate is (1, 0)
    assert sched(fresh, FULL).tolist() == [0, 1]


def test_async_capacity_is_clamped_by_available_candidates():
    sched = AsyncTopKScheduler(TWO_TABLE, min_predicted_gain=0, delay=1, initial_capacity=10)
    assert sched(TWO, torch.tensor([1, 0])).tolist() == [1, 0]


def test_threshold_stops_at_first_low_conditional_confidence():
    conf = torch.tensor([[0.9, 0.4, 0.9], [0.9, 0.9, 0.9], [0.2, 0.9, 0.9], [0.6, 0.6, 0.6]])
    # first below 0.5: index 1, none (3, capped to 2), index 0, none (3)
    assert schedule_threshold(conf, 0.5, torch.tensor([3, 2, 3, 3])).tolist() == [1, 2, 0, 3]
    # threshold 0 never prunes (the reference's offline setting)
    assert schedule_threshold(conf, 0.0, torch.tensor([3, 3, 3, 3])).tolist() == [3, 3, 3, 3]


def test_fixed_and_off():
    assert schedule_fixed(2, torch.tensor([3, 1, 0])).tolist() == [2, 1, 0]
    assert schedule_off(torch.tensor([3, 1])).tolist() == [0, 0]


def test_make_scheduler_one_signature_for_every_mode(tmp_path):
    path = tmp_path / "cost.json"
    TWO_TABLE.to_json(path)
    ml = torch.tensor([3, 3])
    expected = {"off": [0, 0], "fixed": [2, 2], "threshold": [1, 2], "dspark": [1, 2], "async": [0, 0]}
    for mode, lengths in expected.items():
        sched = make_scheduler(mode, block_size=3, gamma=2, threshold=0.6, cost_table=str(path),
                               min_predicted_gain=0)
        assert sched(TWO, ml).tolist() == lengths, mode


def test_make_scheduler_errors_name_the_problem(tmp_path):
    with pytest.raises(DSparkError, match="unknown schedule 'magic'"):
        make_scheduler("magic", block_size=7)
    with pytest.raises(DSparkError, match="confidence head"):
        make_scheduler("dspark", block_size=7, cost_table=TWO_TABLE, has_confidence=False)
    with pytest.raises(DSparkError, match="gamma must be in 0..7"):
        make_scheduler("fixed", block_size=7, gamma=8)
    with pytest.raises(DSparkError, match="dspark-trt profile"):
        make_scheduler("async", block_size=7)
    with pytest.raises(DSparkError, match="dspark-trt profile"):
        make_scheduler("dspark", block_size=7, cost_table=tmp_path / "missing.json")


def test_fixed_defaults_to_the_block_size():
    assert make_scheduler("fixed", block_size=7)(None, torch.tensor([9, 4])).tolist() == [7, 4]


def test_algorithm_1_reads_the_cost_row_of_the_pass_request_count():
    # the diagonal: SPS(B) = 40 / B, so with E < B tokens expected no admission ever gains (Θ = 40·E/B < 40)
    diagonal = {b: 40.0 / b for b in range(1, 9)}
    conf, ml = torch.full((1, 7), 0.9), torch.tensor([7])
    assert schedule_dspark(conf, table(diagonal), ml, min_predicted_gain=0).tolist() == [0]
    # measured for one request: 8 tokens at 0.8x one token's rate. Θ_k = (1 + Σ 0.9^j)·SPS_1(1 + k):
    # Θ7 = 5.70·32 = 182 is the best and each step raises Θ, so all 7 drafts are verified
    rows = table(diagonal, by_requests={1: ([1, 8], [40.0, 32.0])})
    assert schedule_dspark(conf, rows, ml, min_predicted_gain=0).tolist() == [7]
    assert AsyncTopKScheduler(rows, min_predicted_gain=0).capacity(conf, ml) == 7
    assert AsyncTopKScheduler(table(diagonal), min_predicted_gain=0).capacity(conf, ml) == 0
