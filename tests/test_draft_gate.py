"""The draft gate: verification ignores the (sunk) draft cost, the gate counts it before drafting, backs
off while drafting cannot pay, learns real step times, and the engine stays exact when it skips."""
import pytest
import torch

from dspark_trt.engine.engine import Engine
from dspark_trt.engine.request import SamplingParams
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.cost_table import CostTable
from dspark_trt.spec.draft_gate import DraftGate, GatedScheduler
from dspark_trt.spec.scheduler import make_scheduler, schedule_dspark, survival

from conftest import tiny_drafter, tiny_target

HIGH, LOW = torch.tensor([[0.9, 0.9]]), torch.tensor([[0.2, 0.2]])  # E = 2.71 and 1.24 tokens per step
ML = torch.tensor([2])


def observe(gate: DraftGate, conf: torch.Tensor, verified: int, seconds: float, accepted: float | None = None,
            n_requests: int = 1) -> None:
    """A drafted step of one drafter; accepted defaults to what its calibrated survival predicts."""
    lengths = torch.tensor([verified])
    if accepted is None:
        accepted = float(survival(conf, lengths).sum())
    gate.observe_draft(conf, n_requests, lengths, torch.tensor([accepted]), seconds)


def flat_table(draft_seconds: float) -> CostTable:
    """SPS 10 at any batch (0.1 s per target pass) and a fixed draft cost."""
    return CostTable([1, 4], [10.0, 10.0], draft_requests=[1, 8], draft_seconds=[draft_seconds] * 2)


def test_verification_ignores_the_sunk_draft_cost_and_the_gate_counts_it():
    costly = flat_table(0.2)  # drafting + verifying: 2.71 tokens / 0.3 s = 9.0 tok/s < plain 10
    assert schedule_dspark(HIGH, costly, ML).tolist() == [2]  # drafts exist: verifying them is free here
    gate = DraftGate(costly)
    assert gate.plan(ML) == "probe"  # nothing known yet: one request drafts, to learn
    observe(gate, HIGH, 2, seconds=0.3)  # took as long as the table says
    assert gate.predicted_gain(ML) < 0 and gate.plan(ML) == "skip"
    cheap = DraftGate(flat_table(0.05))  # 2.71 / 0.15 s = 18 tok/s
    observe(cheap, HIGH, 2, seconds=0.15)
    assert cheap.predicted_gain(ML) > 0.5 and all(cheap.plan(ML) == "draft" for _ in range(20))
    # a request with no room to verify anything makes drafting pointless
    assert cheap.predicted_gain(torch.tensor([0])) < 0


def test_the_gate_prices_a_step_from_the_cost_row_of_its_request_count():
    # diagonal: 3 tokens cost 3x one (plain 10 tok/s, drafting 2.71 / (0.3 + 0.05) = 7.7 tok/s): skip.
    # one request's row: 3 tokens cost 1.2x one, 2.71 / (0.12 + 0.05) = 16 tok/s: draft.
    diagonal = dict(draft_requests=[1, 8], draft_seconds=[0.05] * 2)
    steep = CostTable([1, 2, 3], [10.0, 5.0, 10.0 / 3], **diagonal)
    rows = CostTable([1, 2, 3], [10.0, 5.0, 10.0 / 3], **diagonal, by_requests={1: ([1, 3], [10.0, 10.0 / 1.2])})
    for table, plan in ((steep, "skip"), (rows, "draft")):
        gate = DraftGate(table, max_backoff=64)
        observe(gate, HIGH, 2, seconds=1.0 / table.sps(3, 1) + 0.05)  # as profiled
        assert gate.plan(ML) == plan


def test_the_gate_prices_each_outcome_of_the_rule_not_the_mean_batch():
    # a jagged row, as on the int4 CPU engines: a second row costs 1.6x one, the rest are free (0.16 s up to 8).
    # The rule verified nothing on an unsure round (1 token, 0.1 s + draft) and all 7 on a sure one (0.16 s + draft).
    jagged = CostTable([1, 2, 8], [10.0, 6.25, 6.25], draft_requests=[1, 8], draft_seconds=[0.02] * 2)
    unsure, sure = torch.full((1, 7), 0.1), torch.full((1, 7), 0.95)
    assert schedule_dspark(unsure, jagged, torch.tensor([7])).tolist() == [0]
    assert schedule_dspark(sure, jagged, torch.tensor([7])).tolist() == [7]
    gate = DraftGate(jagged, smoothing=0.5)
    observe(gate, unsure, 0, seconds=0.12)
    observe(gate, sure, 7, seconds=0.18)
    tokens = 1 + 0.5 * sum(0.95 ** k for k in range(1, 8))  # E over the two rounds: 3.95
    per_outcome = tokens / (0.5 * 0.12 + 0.5 * 0.18) / 10 - 1  # 3.95 / 0.15 s = 26 tok/s against plain 10
    assert gate.predicted_gain(torch.tensor([7])) == pytest.approx(per_outcome)  # 1.63, not 3.95 / 0.18 s: 1.19
    observe(gate, unsure, 0, seconds=0.12)  # the next draft moves the shares to 3/4 and 1/4: priced anew
    later = (0.5 * tokens + 0.5) / (0.75 * 0.12 + 0.25 * 0.18) / 10 - 1
    assert gate.predicted_gain(torch.tensor([7])) == pytest.approx(later)
    # the rule on the two rounds' mean survival would verify nothing (1.525 tokens at 6.25 passes/s < 10): skip
    mean = (survival(unsure, torch.tensor([7])) + survival(sure, torch.tensor([7]))) / 2
    conditional = mean / torch.cat([torch.ones(1, 1, dtype=mean.dtype), mean[:, :-1]], dim=1)
    assert schedule_dspark(conditional, jagged, torch.tensor([7])).tolist() == [0]


def test_a_batch_of_drafts_outweighs_one_probe():
    """A step where 16 requests drafted is 16 rounds of evidence, a probe one: after a confident probe, one step
    of 16 unconfident drafters brings the prediction down to theirs, and the gate stops drafting for all."""
    gate = DraftGate(flat_table(0.05))
    observe(gate, HIGH, 2, seconds=0.15)  # a probe: 2.71 tokens in 0.15 s, drafting pays
    sixteen = torch.full((16,), 2)
    assert gate.plan(sixteen) == "draft"
    lengths = torch.ones(16, dtype=torch.long)
    gate.observe_draft(LOW.repeat(16, 1), 16, lengths, survival(LOW.repeat(16, 1), lengths), seconds=0.15)
    assert gate.expected_tokens < 1.3  # the batch's 1.2, not 0.8 x 2.71 + 0.2 x 1.2 = 2.4
    assert gate.predicted_gain(sixteen) < 0 and gate.plan(sixteen) != "draft"


def test_accepted_drafts_correct_confidences_that_run_high():
    # HIGH predicts 1.71 accepted drafts per step: 2.71 tokens / 0.15 s = 18 tok/s against plain 10
    honest, optimistic = DraftGate(flat_table(0.05)), DraftGate(flat_table(0.05))
    observe(honest, HIGH, 2, seconds=0.15)
    observe(optimistic, HIGH, 2, seconds=0.15, accepted=0.0)  # the target rejected the first draft
    assert honest.token_scale == pytest.approx(1.0) and honest.plan(ML) == "draft"
    assert optimistic.token_scale == 0.0 and optimistic.predicted_gain(ML) < 0 and optimistic.plan(ML) == "skip"
    # a step that verified nothing says nothing about acceptance
    observe(optimistic, HIGH, 0, seconds=0.15)
    assert optimistic.token_scale == 0.0


def test_the_gate_probes_with_exponential_backoff_and_resumes_when_confidence_returns():
    gate = DraftGate(flat_table(0.1), max_backoff=8)  # HIGH: 2.71 / 0.2 s = 13.6 tok/s; LOW: 6.2
    observe(gate, LOW, 0, seconds=0.2)
    drafted = []
    for step in range(60):
        plan = gate.plan(ML)
        if plan != "skip":
            assert plan == "probe"
            drafted.append(step)
            observe(gate, LOW, 0, seconds=0.2)
    gaps = [b - a for a, b in zip(drafted, drafted[1:])]
    assert drafted[0] == 1 and gaps[:4] == [3, 5, 9, 9] and set(gaps[2:]) == {9}  # 1, 2, 4, 8, 8 skips
    for _ in range(8):  # probes find confident drafts again
        observe(gate, HIGH, 2, seconds=0.2)
    assert all(gate.plan(ML) == "draft" for _ in range(10))


def test_measured_step_times_correct_a_cost_table_that_is_too_optimistic():
    gate = DraftGate(flat_table(0.0))  # the table thinks drafting is free: 27 tok/s vs 10
    assert gate.plan(ML) == "probe"
    observe(gate, HIGH, 2, seconds=0.1)
    assert gate.plan(ML) == "draft"
    for _ in range(20):  # drafted steps really take 0.4 s, plain ones 0.1 s as profiled
        observe(gate, HIGH, 2, seconds=0.4)
        gate.observe_plain(1, seconds=0.1)
    assert gate.time_scale["draft"][1] > 3.5 and abs(gate.time_scale["plain"][1] - 1.0) < 0.02
    assert gate.predicted_gain(ML) < 0  # 2.71 / 0.4 s = 6.8 tok/s < 10


def test_step_times_are_learned_per_request_count():
    """Served, a step's overhead beside its passes is a large share of a step of 3 requests and a small one of 16:
    plain steps timed at 3 requests (0.16 s against the table's 0.1) say nothing of plain steps at 16. With one
    scale for all counts the gate drafted at 16, where drafting steps took 1.18x the table, for a gain that was
    not there; per count it compares the two kinds at 16 on the table alone until it times a plain step there."""
    table = CostTable([1, 16, 32], [10.0, 10.0, 6.0], draft_requests=[1, 16], draft_seconds=[0.01, 0.01])
    gate = DraftGate(table, min_predicted_gain=0.0)
    for _ in range(30):
        gate.observe_plain(3, seconds=0.16)
    conf = torch.full((16, 2), 0.5)
    lengths = torch.ones(16, dtype=torch.long)  # each of 16 verifies one draft, accepted half the time
    for _ in range(30):
        gate.observe_draft(conf, 16, lengths, torch.full((16,), 0.5), seconds=1.18 * (1 / 6.0 + 0.01))
    sixteen = torch.full((16,), 2)
    # 24 tokens in 0.177 s (136 tok/s) against 16 in 0.1 s (160 tok/s) on the table: drafting does not pay...
    assert gate.scale("plain", 16) == gate.scale("draft", 16) and gate.predicted_gain(sixteen) < -0.1
    assert gate.scale("plain", 3) > 1.5  # ...though plain steps of 3 requests were slow (one scale: a 15% gain)
    for _ in range(30):  # timed at 16: plain steps there run as the table says
        gate.observe_plain(16, seconds=0.1)
    assert gate.predicted_gain(sixteen) < -0.1


@pytest.mark.parametrize("backlog", [4 + 1, None])  # a block's rows; the default, four blocks'
def test_an_engine_whose_gate_skips_drafts_keeps_the_drafter_context_whole_and_greedy_exact(backlog):
    """A request that does not draft keeps its new target features as a backlog, which its next draft carries,
    or the step's one extension call once it reaches the engine's context_backlog rows: the drafter never
    misses a position and never lags more than that behind, and most skipped steps make no drafter call."""
    target = tiny_target(vocab_size=4, seed=3, scale=3.0)
    drafter = tiny_drafter(target, 4, seed=3)
    prompts = [[3, 1, 2, 1, 0, 2, 3], [2, 1], [1, 3, 2, 0, 2, 3, 3, 1, 0, 0, 2]]
    params = SamplingParams(max_tokens=40)
    ar = [r.output_ids for r in Engine(TorchRuntime(target, num_slots=4, max_seq_len=128)).generate(prompts, params)]
    for draft_seconds in (10.0, 0.0):  # drafting can never pay / always pays
        runtime = TorchRuntime(target, drafter, num_slots=4, max_seq_len=128)
        scheduler = make_scheduler("dspark", 4, cost_table=flat_table(draft_seconds), min_predicted_gain=0.0)
        assert isinstance(scheduler, GatedScheduler)
        scheduler.gate.smoothing = 0.0  # no learning of step times: the tiny model's would make drafting free
        engine = Engine(runtime, scheduler, context_backlog=backlog)
        draft, extend = runtime.draft, runtime.extend_context
        calls, drafted, extended = [], {}, {}  # slots per draft call; slots drafting / extended at each step

        def check_rows(slots, new_features):
            for slot, features in zip(slots.tolist(), new_features):
                rows = 0 if features is None else features.shape[0]
                state = runtime._draft_states[slot]
                # the drafter sees every cached target position, skipped steps' included...
                assert state.length + rows == runtime.cache_length(slot)
                # ...at most a row short of the backlog, plus a verified block and the bonus token
                assert state.length == 0 or rows <= engine.context_backlog - 1 + 4 + 1

        def checked_draft(slots, new_features, *args):
            check_rows(slots, new_features)
            calls.append(slots.tolist())
            drafted[engine.steps] = slots.tolist()
            return draft(slots, new_features, *args)

        def checked_extend(slots, new_features):
            check_rows(slots, new_features)
            assert all(f.shape[0] >= engine.context_backlog for f in new_features)
            assert engine.steps not in extended  # one call a step
            extended[engine.steps] = slots.tolist()
            return extend(slots, new_features)

        runtime.draft, runtime.extend_context = checked_draft, checked_extend
        requests = engine.generate(prompts, params)
        assert [r.output_ids for r in requests] == ar
        rounds = sum(len(r.stats.round_verified) for r in requests)
        drafted_rows = sum(len(c) for c in calls)
        decisions = scheduler.gate.decisions
        assert decisions["draft"] + decisions["probe"] == len(calls) > 0
        if draft_seconds:
            assert decisions["skip"] > 2 * len(calls) and drafted_rows < rounds / 4
            probed = [c[0] for c in calls if len(c) == 1]  # a probe drafts for one request...
            assert len(probed) == decisions["probe"] and len(set(probed)) == 3  # ...each in turn
            # a request's skipped steps add a row each: one extension per backlog's rows of them, not one per step
            skipped = rounds - drafted_rows
            assert 0 < sum(len(slots) for slots in extended.values()) <= skipped / (engine.context_backlog - 1)
        else:  # after the first step's probe, every round of every request drafted
            assert decisions["skip"] == 0 and decisions["probe"] == 1 and calls[0] == [calls[1][0]]
            assert drafted_rows == rounds - 2
            # only the first step extended: the prompts of at least the backlog's rows, the probe's included
            long_prompts = [i for i, p in enumerate(prompts) if len(p) >= engine.context_backlog]  # prompt i: slot i
            assert list(extended) == ([1] if long_prompts else []) and extended.get(1, []) == long_prompts


def test_the_gate_times_the_decode_pass_without_context_extensions():
    """A context extension (a new prompt's rows, or a backlog) is paid whatever the gate decides: the plain
    steps the gate learns from must not include it. Here every extension takes 50 ms, ten times anything the
    tiny model's decode pass takes, and no plain step the gate observes is that slow."""
    import time

    target = tiny_target(vocab_size=4, seed=3, scale=3.0)
    runtime = TorchRuntime(target, tiny_drafter(target, 4, seed=3), num_slots=2, max_seq_len=128)
    scheduler = make_scheduler("dspark", 4, cost_table=flat_table(10.0))  # drafting never pays: plain steps
    engine = Engine(runtime, scheduler, context_backlog=5)
    extend, extended, observed = runtime.extend_context, [], []

    def slow_extend(slots, new_features):
        extended.append(engine.steps)
        time.sleep(0.05)
        return extend(slots, new_features)

    observe_plain = scheduler.gate.observe_plain

    def record(n, seconds):
        observed.append(seconds)
        return observe_plain(n, seconds)

    runtime.extend_context, scheduler.gate.observe_plain = slow_extend, record
    engine.generate([[3, 1, 2, 1, 0, 2, 3], [1, 3, 2, 0, 2, 3, 3, 1, 0, 0, 2]], SamplingParams(max_tokens=30))
    assert len(extended) >= 4 and len(observed) > 20  # the prompts' rows, then backlogs of skipped steps
    assert max(observed) < 0.04
