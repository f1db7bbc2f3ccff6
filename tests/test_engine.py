"""The engine's promises: greedy speculation is token-identical to AR; sampling follows the target's
distribution exactly (chi-square with fixed seeds, and the test fails on a biased verifier);
continuous batching, streaming, stop conditions, cancellation and slot hygiene."""
import itertools

import pytest
import torch

from dspark_trt.engine.engine import Engine
from dspark_trt.engine.request import SamplingParams, Status
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.controls import History, apply_controls
from dspark_trt.spec.sampling import token_logprobs, warp_probs
from dspark_trt.spec.scheduler import make_scheduler
from dspark_trt.spec.verify import VerifyResult, dspark_verify

from conftest import chi_square_p_value, next_logits, oracle_runtime, tiny_drafter, tiny_target

PROMPTS = [[3, 1, 2, 1, 0, 2, 3], [2, 1], [1, 3, 2, 0, 2, 3, 3, 1, 0, 0, 2]]


def _engine(target, drafter=None, schedule="fixed", slots=8, **kw):
    scheduler = make_scheduler(schedule, drafter.config.block_size if drafter else 0, **kw) if drafter else None
    return Engine(TorchRuntime(target, drafter, num_slots=slots, max_seq_len=128), scheduler)


@pytest.mark.parametrize("block_size", range(1, 9))
def test_greedy_speculation_equals_autoregressive(block_size):
    target = tiny_target(vocab_size=4, seed=block_size, scale=3.0)
    drafter = tiny_drafter(target, block_size, seed=block_size)
    params = SamplingParams(max_tokens=24)
    ar = [r.output_ids for r in _engine(target).generate(PROMPTS, params)]
    alone = [_engine(target, drafter).generate([p], params)[0] for p in PROMPTS]
    batched = _engine(target, drafter).generate(PROMPTS, params)
    assert [r.output_ids for r in alone] == ar
    assert [r.output_ids for r in batched] == ar
    assert sum(r.stats.draft_tokens_verified for r in batched) > 0  # speculation really happened
    assert all(len(r.output_ids) == 24 for r in batched)


def test_greedy_drafts_do_get_accepted():
    """Across block sizes the random drafters match the target sometimes, so the accept path runs."""
    accepted = 0
    for block_size in range(1, 9):
        target = tiny_target(vocab_size=4, seed=block_size, scale=3.0)
        requests = _engine(target, tiny_drafter(target, block_size, seed=block_size)).generate(
            PROMPTS, SamplingParams(max_tokens=24))
        accepted += sum(r.stats.draft_tokens_accepted for r in requests)
        assert all(len(r.output_ids) == sum(r.stats.accepted_lengths) + 1 for r in requests)
    assert accepted > 0


@pytest.mark.slow
def test_greedy_speculation_on_smollm2_equals_autoregressive(smollm2):
    from dspark_trt.engine.prompts import chat_prompt_ids
    from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter

    model, tokenizer = smollm2
    drafter = random_drafter(drafter_config_for_target(model.config, block_size=5), seed=0, target=model)
    prompts = [chat_prompt_ids(tokenizer, t) for t in ("Name three colors.", "What is 12 times 12?")]
    params = SamplingParams(max_tokens=24, stop_ids=tuple(model.config.eos_token_ids))
    ar = [r.output_ids for r in Engine(TorchRuntime(model, num_slots=2)).generate(prompts, params)]
    spec = Engine(TorchRuntime(model, drafter, num_slots=2), make_scheduler("fixed", 5)).generate(prompts, params)
    assert [r.output_ids for r in spec] == ar


def _plain_step_logits(target, seq, prompt_len, params):
    """Plain decoding's logits for the token after seq: the target's, with the request's controls."""
    history = History(seq, len(seq) - prompt_len, params.controls)
    return apply_controls(next_logits(target, seq), torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long),
                          [history], torch.tensor([params.temperature]))


def _exact_distribution(target, prompt, n_tokens, params):
    """P(x_1..x_n | prompt) for every token tuple, by enumeration with the target alone (and the controls)."""
    vocab = target.config.vocab_size

    def next_probs(seq):
        logits = _plain_step_logits(target, seq, len(prompt), params)
        return warp_probs(logits, params.temperature, params.top_k, params.top_p)[0]

    probs = {}
    for tokens in itertools.product(range(vocab), repeat=n_tokens):
        p = 1.0
        for k in range(n_tokens):
            p *= float(next_probs(prompt + list(tokens[:k]))[tokens[k]]) if p > 0 else 0.0
        probs[tokens] = p
    return probs


def _sample_outputs(target, drafter, prompt, params, n_samples, n_tokens, engine=None):
    engine = engine or _engine(target, drafter, slots=64)
    engine.max_queue_size = n_samples
    requests = [engine.add_request(prompt, SamplingParams(**{**params.__dict__, "seed": seed}))
                for seed in range(n_samples)]
    engine.run()
    return [tuple(r.output_ids[:n_tokens]) for r in requests], requests


SAMPLING_CASES = [SamplingParams(max_tokens=4, temperature=1.0),
                  SamplingParams(max_tokens=4, temperature=0.7, top_k=4, top_p=0.9)]


def _first_tokens_p_value(params, make_engine=None, draft_ids=None, n_samples: int = 3000):
    """Chi-square p-value of the first 3 sampled tokens (n_samples seeded requests) against the exact target
    distribution, and the requests (for their acceptance counters). make_engine(target, drafter):
    another engine than the default fixed-schedule one; draft_ids: a reduced draft vocabulary."""
    target = tiny_target(vocab_size=5, seed=11, scale=1.5)
    drafter = tiny_drafter(target, block_size=3, seed=12, draft_ids=draft_ids)
    prompt = [1, 3, 2]
    exact = _exact_distribution(target, prompt, 3, params)
    engine = make_engine(target, drafter) if make_engine else None
    outputs, requests = _sample_outputs(target, drafter, prompt, params, n_samples=n_samples, n_tokens=3,
                                        engine=engine)
    keys = sorted(exact)
    return chi_square_p_value([outputs.count(k) for k in keys], [exact[k] for k in keys]), requests


@pytest.mark.parametrize("params", SAMPLING_CASES, ids=["T1", "T0.7-topk4-topp0.9"])
def test_sampling_follows_target_distribution(params):
    p_value, requests = _first_tokens_p_value(params)
    assert p_value > 1e-3
    # and the drafts were really put to the test: both acceptances and rejections happened
    accepted = sum(r.stats.draft_tokens_accepted for r in requests)
    verified = sum(r.stats.draft_tokens_verified for r in requests)
    assert 0.1 * verified < accepted < 0.95 * verified


@pytest.mark.parametrize("params", SAMPLING_CASES, ids=["T1", "T0.7-topk4-topp0.9"])
def test_sampling_stays_exact_with_a_reduced_draft_vocabulary(params):
    """Drafts from 3 of the 5 tokens: the verifier sees q = 0 outside them, and the output still follows
    the target exactly (tokens outside the draft vocabulary come from the residual and bonus draws)."""
    p_value, requests = _first_tokens_p_value(params, draft_ids=[0, 2, 3])
    assert p_value > 1e-3
    accepted = sum(r.stats.draft_tokens_accepted for r in requests)
    verified = sum(r.stats.draft_tokens_verified for r in requests)
    assert 0.1 * verified < accepted < 0.95 * verified
    outputs = [set(r.output_ids[:3]) for r in requests]
    assert any({1, 4} & tokens for tokens in outputs)  # tokens the drafter cannot propose were emitted


def test_greedy_speculation_with_a_reduced_draft_vocabulary_equals_autoregressive():
    target = tiny_target(vocab_size=6, seed=5, scale=3.0)
    drafter = tiny_drafter(target, 4, seed=5, draft_ids=[1, 2, 3, 5])
    params = SamplingParams(max_tokens=24)
    ar = [r.output_ids for r in _engine(target).generate(PROMPTS, params)]
    spec = _engine(target, drafter).generate(PROMPTS, params)
    assert [r.output_ids for r in spec] == ar
    assert sum(r.stats.draft_tokens_accepted for r in spec) > 0


def test_sampling_stays_exact_when_the_draft_gate_skips_and_probes():
    """Four slots and a gate that probes every other step (one of the four requests drafts) while skipping
    the rest: rounds that verify a subset's drafts, rounds that verify none, and rounds of both mixed."""
    from dspark_trt.spec.cost_table import CostTable
    from dspark_trt.spec.draft_gate import DraftGate, GatedScheduler
    from dspark_trt.spec.scheduler import schedule_fixed

    table = CostTable([1, 8], [10.0, 10.0], draft_requests=[1, 2], draft_seconds=[10.0, 10.0])  # never pays
    gates = []

    def make_engine(target, drafter):
        # smoothing 0: the gate does not learn step times (the tiny model's would make drafting look free)
        gates.append(DraftGate(table, max_backoff=1, smoothing=0.0))
        scheduler = GatedScheduler(lambda conf, max_lengths: schedule_fixed(3, max_lengths), gates[-1])
        return Engine(TorchRuntime(target, drafter, num_slots=4, max_seq_len=128), scheduler)

    p_value, requests = _first_tokens_p_value(SAMPLING_CASES[0], make_engine)
    assert p_value > 1e-3
    decisions = gates[0].decisions
    assert decisions["probe"] > 500 and decisions["skip"] > 500
    assert sum(r.stats.draft_tokens_accepted for r in requests) > 100  # probed drafts were accepted too


def test_biased_verifier_fails_the_same_test(monkeypatch):
    """Resampling from p instead of the residual max(0, p - q) is a classic bug: the test must see it."""

    def biased_verify(target_logits, draft_tokens, draft_probs, row_offsets, *args):
        result = dspark_verify(target_logits, draft_tokens, draft_probs, row_offsets, *args)
        wrong = dspark_verify(target_logits, draft_tokens, None if draft_probs is None else
                              torch.zeros_like(draft_probs), row_offsets, *args)
        rejected = result.accepted < (row_offsets[1:] - row_offsets[:-1] - 1)
        return VerifyResult(result.accepted, torch.where(rejected, wrong.next_token, result.next_token))

    monkeypatch.setattr("dspark_trt.runtimes.base.dspark_verify", biased_verify)  # the torch runtime verifies there
    # a third of the samples of the tests it stands for: the bug gave p ~ 1e-162 at 1000, 1e-21 at 500
    assert _first_tokens_p_value(SAMPLING_CASES[0], n_samples=1000)[0] < 1e-3


# ---- logit controls (spec/controls.py) under speculation ----------------------------------------------
CONTROL_PROMPTS = [[3, 1, 2], [2, 1], [1, 3, 2, 0, 2]]
CONTROLS = ["repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "bad_words"]


def _control_case(control: str):
    """(target, params with that control, the same params without it). The target's plain greedy output of
    CONTROL_PROMPTS[0] is 1 7 4 7 4 ...: min_tokens holds back the stop id 4, the bad words are a token it
    emits and a bigram it repeats."""
    target = tiny_target(vocab_size=16, seed=1, scale=3.0)
    plain = _engine(target).generate(CONTROL_PROMPTS[:1], SamplingParams(max_tokens=8))[0].output_ids
    stop_ids = (plain[2],) if control == "min_tokens" else ()
    value = {"repetition_penalty": 1.5, "presence_penalty": 1.0, "frequency_penalty": 0.7, "min_tokens": 10,
             "bad_words": ((plain[0],), (plain[1], plain[2]))}[control]
    return (target, SamplingParams(max_tokens=24, stop_ids=stop_ids, **{control: value}),
            SamplingParams(max_tokens=24, stop_ids=stop_ids))


def _oracle_engine(target, block_size: int, slots: int = 8) -> Engine:
    return Engine(oracle_runtime(target, block_size, num_slots=slots), make_scheduler("fixed", block_size))


@pytest.mark.parametrize("block_size", [2, 4])
@pytest.mark.parametrize("control", CONTROLS)
def test_greedy_speculation_under_each_control_equals_autoregressive(control, block_size):
    """The drafter proposes the target's own uncontrolled continuation (conftest.oracle_runtime): the control
    makes the verifier accept some drafts and reject others, at every block position."""
    target, params, without = _control_case(control)
    ar = [r.output_ids for r in _engine(target).generate(CONTROL_PROMPTS, params)]
    spec = _oracle_engine(target, block_size).generate(CONTROL_PROMPTS, params)
    assert [r.output_ids for r in spec] == ar
    assert ar != [r.output_ids for r in _engine(target).generate(CONTROL_PROMPTS, without)]  # it did something
    accepted = sum(r.stats.draft_tokens_accepted for r in spec)
    assert 0 < accepted < sum(r.stats.draft_tokens_verified for r in spec)
    if control == "min_tokens":
        assert all(len(ids) >= 10 and ids[-1] in params.stop_ids and params.stop_ids[0] not in ids[:-1] for ids in ar)


@pytest.mark.parametrize("control", CONTROLS)
def test_a_verifier_blind_to_the_drafts_fails_the_same_test(control, monkeypatch):
    """Controlling every row of a request with its history at the anchor (the drafts before a row not counted,
    not seen as generated, not matched as a bad word's prefix) is the bug the identity above must catch."""
    target, params, _ = _control_case(control)
    ar = [r.output_ids for r in _engine(target).generate(CONTROL_PROMPTS, params)]

    def blind(logits, row_offsets, draft_tokens, histories, temperature):
        rows = [apply_controls(logits[j: j + 1], torch.tensor([0, 1]), draft_tokens[:0], [history],
                               temperature[r: r + 1])
                for r, history in enumerate(histories) for j in range(int(row_offsets[r]), int(row_offsets[r + 1]))]
        return torch.cat(rows)

    monkeypatch.setattr("dspark_trt.runtimes.base.apply_controls", blind)  # the torch runtime controls there
    assert [r.output_ids for r in _oracle_engine(target, 4).generate(CONTROL_PROMPTS, params)] != ar


def test_sampling_under_every_control_follows_the_controlled_target_distribution():
    """Chi-square of the first 3 tokens at T = 0.9 with all five controls at once (min_tokens 3 keeps the stop
    id out of them) against plain decoding's exact distribution with the same controls."""
    params = SamplingParams(max_tokens=4, temperature=0.9, repetition_penalty=1.6, presence_penalty=0.5,
                            frequency_penalty=0.4, min_tokens=3, stop_ids=(4,), bad_words=((0, 3),))
    p_value, requests = _first_tokens_p_value(params, lambda target, drafter: _oracle_engine(target, 3, slots=64))
    assert p_value > 1e-3
    accepted = sum(r.stats.draft_tokens_accepted for r in requests)
    assert 0.1 * sum(r.stats.draft_tokens_verified for r in requests) < accepted


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_log_probs_are_the_targets_own_for_every_output_token(temperature):
    """Under speculation as in plain decoding: log-softmax of the raw target logits at each position (before
    controls and temperature), whether the token was an accepted draft, a correction or a bonus."""
    target = tiny_target(vocab_size=16, seed=1, scale=3.0)
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=5, presence_penalty=0.8,
                            return_log_probs=True)
    for engine in (_engine(target), _oracle_engine(target, 3)):
        for prompt, request in zip(CONTROL_PROMPTS, engine.generate(CONTROL_PROMPTS, params)):
            seq = prompt + request.output_ids
            expected = [float(token_logprobs(next_logits(target, seq[:k]), torch.tensor([seq[k]]))[0])
                        for k in range(len(prompt), len(seq))]
            assert request.output_logprobs == pytest.approx(expected, abs=1e-4)
    plain = _engine(target).generate(CONTROL_PROMPTS, SamplingParams(max_tokens=12))
    assert all(r.output_logprobs == [] for r in plain)  # kept only when asked for


def test_min_tokens_holds_back_stop_strings_too():
    target = tiny_target(vocab_size=8, seed=5, scale=2.0)
    ar = _engine(target).generate([PROMPTS[2]], SamplingParams(max_tokens=30))[0].output_ids
    engine = Engine(TorchRuntime(target, num_slots=2, max_seq_len=128),
                    detokenize=lambda ids: "".join(chr(97 + t) for t in ids))
    needle = "".join(chr(97 + t) for t in ar[1:3])
    early = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=30, stop_strings=(needle,)))[0]
    held = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=30, stop_strings=(needle,), min_tokens=8))[0]
    assert len(early.output_ids) == 3 and len(held.output_ids) >= 8 and held.output_ids[:3] == ar[:3]


def test_same_seed_same_output_and_streaming_chunks():
    target = tiny_target(vocab_size=8, seed=3, scale=2.0)
    drafter = tiny_drafter(target, block_size=4, seed=4)
    chunks = []
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=42)
    engine = _engine(target, drafter)
    first = engine.add_request(PROMPTS[0], params, on_tokens=lambda r, ids, done: chunks.append((list(ids), done)))
    engine.run()
    second = _engine(target, drafter).generate([PROMPTS[0]], params)[0]
    assert first.output_ids == second.output_ids
    assert [t for ids, _ in chunks for t in ids] == first.output_ids
    assert [done for _, done in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) - 1 == len(first.stats.accepted_lengths)  # one chunk per round + the first token


def test_stop_ids_max_tokens_and_slot_release():
    target = tiny_target(vocab_size=8, seed=5, scale=2.0)
    drafter = tiny_drafter(target, block_size=4, seed=6)
    ar = _engine(target).generate([PROMPTS[2]], SamplingParams(max_tokens=30))[0].output_ids
    stop = ar[7]
    first_stop = ar.index(stop)
    engine = _engine(target, drafter, slots=2)
    reqs = engine.generate([PROMPTS[2]] * 3, SamplingParams(max_tokens=30, stop_ids=(stop,)))
    for r in reqs:
        assert r.output_ids == ar[: first_stop + 1] and r.finish_reason == "stop"
    assert engine.runtime.free_slots == 2
    short = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=5))[0]
    assert short.output_ids == ar[:5] and short.finish_reason == "length"


def test_stop_string_via_detokenizer():
    target = tiny_target(vocab_size=8, seed=5, scale=2.0)
    ar = _engine(target).generate([PROMPTS[2]], SamplingParams(max_tokens=30))[0].output_ids
    engine = Engine(TorchRuntime(target, num_slots=2, max_seq_len=128),
                    detokenize=lambda ids: "".join(chr(97 + t) for t in ids))
    needle = "".join(chr(97 + t) for t in ar[3:5])
    r = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=30, stop_strings=(needle,)))[0]
    text = "".join(chr(97 + t) for t in r.output_ids)
    assert needle in text and needle not in text[:-1] and r.finish_reason == "stop"


def test_cancellation_frees_slots_and_spares_others():
    target = tiny_target(vocab_size=8, seed=7, scale=2.0)
    drafter = tiny_drafter(target, block_size=3, seed=8)
    engine = _engine(target, drafter, slots=4)
    params = SamplingParams(max_tokens=40)
    reqs = [engine.add_request(p, params) for p in PROMPTS * 3]
    for _ in range(3):
        engine.step()
    victims = reqs[::3]
    for r in victims:
        engine.cancel(r)
    engine.run()
    assert all(r.status == Status.CANCELLED for r in victims)
    others = [r for r in reqs if r not in victims]
    assert all(r.status == Status.FINISHED and len(r.output_ids) == 40 for r in others)
    assert engine.runtime.free_slots == 4


def test_failure_in_a_step_fails_those_requests_not_the_engine(monkeypatch):
    target = tiny_target(vocab_size=8, seed=9, scale=2.0)
    engine = _engine(target)
    bad = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=10))
    original = engine.runtime.target_forward
    monkeypatch.setattr(engine.runtime, "target_forward",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.step()
    assert bad.status == Status.FAILED and "boom" in bad.error
    monkeypatch.setattr(engine.runtime, "target_forward", original)
    good = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10))[0]
    assert good.status == Status.FINISHED and len(good.output_ids) == 10
    assert engine.runtime.free_slots == 8


def test_chunked_prefill_and_joining_mid_run_change_nothing():
    target = tiny_target(vocab_size=8, seed=13, scale=2.0)
    drafter = tiny_drafter(target, block_size=3, seed=14)
    long_prompt = [i % 7 for i in range(50)]
    params = SamplingParams(max_tokens=12)
    reference = _engine(target, drafter).generate([long_prompt, PROMPTS[0]], params)
    engine = _engine(target, drafter)
    engine.max_batch_tokens = 16  # the 50-token prompt is prefilled in 4 chunks
    first = engine.add_request(long_prompt, params)
    for _ in range(4):
        engine.step()
    assert first.prefilled == 50 and 0 < len(first.output_ids) < 12
    late = engine.add_request(PROMPTS[0], params)  # joins while the first one is decoding
    engine.run()
    assert first.output_ids == reference[0].output_ids
    assert late.output_ids == reference[1].output_ids
