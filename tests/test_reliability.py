"""Reliability without a server: the request-parsing table and its fuzzing, then the orchestrator over a
real tiny engine (ONNX Runtime, random weights; in-process, no tritonserver): overload, 200 requests
with random cancellations, injected faults, corrupt engine and checkpoint files."""
import math
import random
import re
import shutil
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_triton_serving import NEVER, TIMEOUT_S, engines, pair  # noqa: F401 - the tiny engines, shared

from dspark_trt.engine.engine import EngineOverloadedError
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.request import InvalidRequestError, SamplingParams, Status
from dspark_trt.errors import DSparkError
from dspark_trt.graphs.integrity import CorruptEngineError
from dspark_trt.serving.bls_services import DraftService, TargetService
from dspark_trt.serving.orchestrator import Job, Orchestrator
from dspark_trt.serving.request_parsing import (NEUTRAL_OPTIONS, GenerationRequest, Limits, TextRequest,
                                                parse_generation_request, parse_text_request)
from dspark_trt.serving.text import encode_word_list

VOCAB, CONTEXT = 12, 128  # the tiny engines' vocabulary (w0..w11) and context limit
LIMITS = Limits(vocab_size=VOCAB, max_seq_len=CONTEXT, eos_ids=(1,))


# ---- the bad-input table, as a client sends it to the ensemble -------------------------------------------
def one(value, dtype) -> np.ndarray:
    """A [1, 1] tensor, as a client sends a scalar field."""
    return np.array([[value]], dtype=dtype)


def text(value: str | bytes) -> np.ndarray:
    return one(value.encode() if isinstance(value, str) else value, np.object_)


GOOD = {"text_input": text("w5 w6"), "max_tokens": one(2, np.int32)}
# (row id, fields changed from GOOD (None = left out), the field the error must name, also over HTTP JSON)
BAD_INPUTS = [
    ("missing text_input", {"text_input": None}, "text_input", True),
    ("empty prompt", {"text_input": text("")}, "text_input", True),
    ("prompt over the context limit", {"text_input": text("w5 " * CONTEXT)}, "text_input", True),
    ("max_tokens zero", {"max_tokens": one(0, np.int32)}, "max_tokens", True),
    ("max_tokens negative", {"max_tokens": one(-3, np.int32)}, "max_tokens", True),
    ("max_tokens over the limit", {"max_tokens": one(CONTEXT, np.int32)}, "max_tokens", True),
    ("temperature negative", {"temperature": one(-0.5, np.float32)}, "temperature", True),
    ("temperature nan", {"temperature": one(math.nan, np.float32)}, "temperature", False),  # JSON has no NaN
    ("temperature inf", {"temperature": one(math.inf, np.float32)}, "temperature", False),
    ("top_p zero", {"top_p": one(0.0, np.float32)}, "top_p", True),
    ("top_p above one", {"top_p": one(1.5, np.float32)}, "top_p", True),
    ("top_k negative", {"top_k": one(-1, np.int32)}, "top_k", True),
    ("max_tokens as float", {"max_tokens": one(2.0, np.float32)}, "max_tokens", False),  # JSON 2.0 is INT32 2
    ("max_tokens two values", {"max_tokens": np.array([[2, 3]], np.int32)}, "max_tokens", False),  # JSON: a batch
    ("text_input as ints", {"text_input": one(7, np.int32)}, "text_input", False),  # JSON 7 is a BYTES "7"
    ("text_input invalid UTF-8", {"text_input": text(b"w5 \xff\xfe")}, "text_input", False),  # JSON is UTF-8
    ("stop_words not strings", {"stop_words": np.array([[3, 4]], np.int32)}, "stop_words", False),
    ("bad word of no token", {"bad_words": np.array([[b"w7", b"  "]], np.object_)}, "bad_words", True),
    ("stop word of no token", {"stop_words": np.array([[b" "]], np.object_)}, "stop_words", True),
    ("repetition_penalty zero", {"repetition_penalty": one(0.0, np.float32)}, "repetition_penalty", True),
    ("repetition_penalty negative", {"repetition_penalty": one(-1.2, np.float32)}, "repetition_penalty", True),
    ("presence_penalty inf", {"presence_penalty": one(math.inf, np.float32)}, "presence_penalty", False),
    ("frequency_penalty nan", {"frequency_penalty": one(math.nan, np.float32)}, "frequency_penalty", False),
    ("min_tokens negative", {"min_tokens": one(-1, np.int32)}, "min_tokens", True),
    ("min_tokens over max_tokens", {"min_tokens": one(3, np.int32)}, "min_tokens", True),
    ("beam_width 2", {"beam_width": one(2, np.int32)}, "beam_width", True),
    ("length_penalty", {"length_penalty": one(0.5, np.float32)}, "length_penalty", True),
    ("return_context_logits", {"return_context_logits": one(True, np.bool_)}, "return_context_logits", True),
    ("return_generation_logits", {"return_generation_logits": one(True, np.bool_)}, "return_generation_logits",
     True),
]


def request_fields(changes: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in (GOOD | changes).items() if v is not None}


class WordTokenizer:
    """The tiny pair's word-level tokenizer and chat template (w2 ... w3 w4), without loading it."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(w[1:]) if w[1:].isdigit() and int(w[1:]) < VOCAB else 0 for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


def parse_as_served(fields: dict[str, np.ndarray]) -> GenerationRequest:
    """What the ensemble does with a client's fields: preprocessing's parse, then dspark_bls's."""
    parsed = parse_text_request({k: v for k, v in fields.items() if k in TEXT_FIELDS})
    tokenizer = WordTokenizer()
    bls = {BLS_NAMES[k]: v for k, v in fields.items() if k in BLS_NAMES}
    bls["input_ids"] = np.array([[2, *tokenizer.encode(parsed.prompt), 3, 4]], np.int32)  # the chat template
    bls["end_id"] = one(parsed.end_id, np.int32)
    bls["stop_words_list"] = encode_word_list(tokenizer, list(parsed.stop_words), "stop_words")[None]
    bls["bad_words_list"] = encode_word_list(tokenizer, list(parsed.bad_words), "bad_words")[None]
    return parse_generation_request(bls, LIMITS, decode=tokenizer.decode)


TEXT_FIELDS = {"text_input", "stop_words", "bad_words", "end_id", "pad_id", *NEUTRAL_OPTIONS}
BLS_NAMES = {"max_tokens": "request_output_len", "stream": "streaming", "temperature": "temperature",
             "top_p": "runtime_top_p", "top_k": "runtime_top_k", "seed": "seed", "random_seed": "random_seed",
             "return_perf_metrics": "return_perf_metrics", "repetition_penalty": "repetition_penalty",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
             "min_tokens": "min_tokens", "return_log_probs": "return_log_probs"}


@pytest.mark.parametrize("changes, field", [(c, f) for _, c, f, _ in BAD_INPUTS], ids=[r[0] for r in BAD_INPUTS])
def test_each_bad_input_is_refused_with_an_error_naming_the_field(changes, field):
    with pytest.raises(InvalidRequestError, match=rf"^{field}\b"):
        parse_as_served(request_fields(changes))


def test_good_inputs_parse_to_the_request_the_client_meant():
    parsed = parse_as_served(request_fields({
        "temperature": one(0.7, np.float32), "top_p": one(0.9, np.float32), "top_k": one(5, np.int32),
        "seed": one(2**64 - 1, np.uint64), "stream": one(True, np.bool_), "stop_words": np.array([[b"w7", b"w8 w9"]]),
        "beam_width": one(1, np.int32), "length_penalty": one(1.0, np.float32), "end_id": one(NEVER, np.int32),
        "repetition_penalty": one(1.25, np.float32), "presence_penalty": one(-0.5, np.float32),
        "frequency_penalty": one(0.75, np.float32), "min_tokens": one(CONTEXT - 5, np.int32),
        "bad_words": np.array([[b"w9", b"", b"w5 w6"]]), "return_log_probs": one(True, np.bool_),
        "max_tokens": one(CONTEXT - 5, np.int32)}))  # the prompt is 5 tokens with the template: the largest budget
    assert parsed.prompt_ids == [2, 5, 6, 3, 4] and parsed.stream and not parsed.perf_metrics
    p = parsed.params
    assert (p.max_tokens, p.top_k, p.seed) == (CONTEXT - 5, 5, 2**64 - 1)
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9)
    assert p.stop_ids == (NEVER, 7) and p.stop_strings == ("w8 w9",)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.25, -0.5, 0.75)
    assert p.min_tokens == CONTEXT - 5 and p.bad_words == ((9,), (5, 6)) and p.return_log_probs
    assert parse_text_request({"text_input": text("héllo")}) == TextRequest(prompt="héllo")


# ---- fuzzing: any tensors in, a parsed request or an InvalidRequestError out -----------------------------
def objects():
    return st.lists(st.one_of(st.binary(max_size=8), st.text(max_size=8), st.integers(), st.none(),
                              st.floats()), max_size=4).map(lambda items: np.array(items + [None], np.object_)[:-1])


def numbers():
    dtypes = st.sampled_from([np.int32, np.int64, np.uint64, np.float32, np.float64, np.bool_, np.int8])
    values = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans())

    def build(dtype, items, shape):
        with np.errstate(all="ignore"):
            try:
                return np.array(items, dtype=object).astype(dtype).reshape(shape)
            except (OverflowError, ValueError, TypeError):
                return np.zeros(shape, dtype)

    return st.builds(lambda dtype, items, extra: build(dtype, items, (1, len(items)) if extra else (len(items),)),
                     dtypes, st.lists(values, max_size=4), st.booleans())


def tensors():
    return st.one_of(numbers(), objects(), st.none())


TEXT_NAMES = sorted(TEXT_FIELDS) + ["unknown"]
BLS_INPUTS = ["input_ids", "request_output_len", "stop_words_list", "bad_words_list", "end_id", "streaming",
              "temperature", "runtime_top_p", "runtime_top_k", "seed", "random_seed", "return_perf_metrics",
              "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "return_log_probs"]

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.dictionaries(st.sampled_from(TEXT_NAMES), tensors()))
def test_fuzzed_text_inputs_parse_or_raise_the_clean_error(inputs):
    try:
        parsed = parse_text_request(inputs)
    except InvalidRequestError:
        return
    assert isinstance(parsed.prompt, str) and parsed.prompt
    assert all(isinstance(w, str) and w for w in parsed.stop_words + parsed.bad_words)


@FUZZ
@given(st.dictionaries(st.sampled_from(BLS_INPUTS), tensors()),
       st.lists(st.integers(-3, VOCAB + 3), max_size=CONTEXT + 2), st.integers(-2, 3 * CONTEXT))
def test_fuzzed_generation_inputs_parse_or_raise_the_clean_error(inputs, ids, max_tokens):
    inputs.setdefault("input_ids", np.array([ids], np.int64))
    inputs.setdefault("request_output_len", one(max_tokens, np.int32))
    inputs.setdefault("stop_words_list", np.array([ids[:2], [len(ids[:2]), -1][:len(ids[:2])]], np.int32)
                      if len(ids) >= 2 else None)
    try:
        parsed = parse_generation_request(inputs, LIMITS, decode=WordTokenizer().decode)
    except InvalidRequestError:
        return
    assert parsed.prompt_ids and all(0 <= t < VOCAB for t in parsed.prompt_ids)
    assert len(parsed.prompt_ids) + parsed.params.max_tokens <= CONTEXT
    assert all(0 <= t < VOCAB for t in parsed.params.stop_ids)
    assert all(word and all(0 <= t < VOCAB for t in word) for word in parsed.params.bad_words)


# ---- the orchestrator over a real tiny engine ------------------------------------------------------------
class Sender:
    """A fake response sender: cancels its request after `cancel_after` responses, or breaks on send."""

    def __init__(self, cancel_after: int | None = None, broken: bool = False):
        self.responses: list[tuple[dict | None, str | None, bool]] = []
        self.cancel_after, self.broken = cancel_after, broken
        self.cancelled = cancel_after == 0
        self.done = threading.Event()


def respond(job, outputs, error, final):
    sender = job.sender
    if sender.broken:
        sender.done.set()
        raise ConnectionResetError("client went away")
    sender.responses.append((outputs, error, final))
    if sender.cancel_after is not None and len(sender.responses) >= sender.cancel_after:
        sender.cancelled = True
    if final:
        sender.done.set()


def new_job(prompt, max_tokens=12, sender=None, **params) -> Job:
    return Job(prompt_ids=prompt, params=SamplingParams(max_tokens=max_tokens, stop_ids=(NEVER,), **params),
               stream=True, perf_metrics=False, sender=sender or Sender())


def streamed_ids(job) -> list[int]:
    """The output ids a streaming client reassembles from its responses."""
    ids = []
    for outputs, _, _ in job.sender.responses:
        if outputs is not None:
            ids += outputs["output_ids"][0].tolist()[int(outputs["prefix_length"][0, 0]):]
    return ids


@pytest.fixture
def serving(engines):  # noqa: F811
    """start(num_slots, max_queue_size) -> a running Orchestrator over the tiny engines; all stopped after."""
    loops = []

    def start(num_slots=4, max_queue_size=1024, run=True):
        engine, _ = build_engine(EngineOptions(engines=str(engines), num_slots=num_slots,
                                               max_queue_size=max_queue_size, check_files=True))
        loop = Orchestrator(engine, respond, lambda job: job.sender.cancelled)
        if run:
            loop.start()
        loops.append(loop)
        return loop

    yield start
    for loop in loops:
        loop.stop()


PROMPTS = [[2, 5 + i % 6, 6 + i % 5, 3, 4][: 3 + i % 3] for i in range(10)]


@pytest.fixture(scope="module")
def reference(engines):  # noqa: F811
    """Each PROMPTS entry's greedy 12 tokens, with no cancellations or faults around."""
    engine, _ = build_engine(EngineOptions(engines=str(engines), num_slots=len(PROMPTS), check_files=True))
    return [r.output_ids for r in engine.generate(PROMPTS, SamplingParams(max_tokens=12, stop_ids=(NEVER,)))]


def test_a_full_queue_refuses_at_once_with_overloaded_and_memory_stays_bounded(serving):
    loop = serving(num_slots=1, max_queue_size=3, run=False)  # the engine thread not started: nothing drains
    jobs = [new_job([5, 6, 7], max_tokens=4) for _ in range(3)]
    for j in jobs:
        loop.submit(j)
    began = time.monotonic()
    with pytest.raises(EngineOverloadedError, match=r"^overloaded: 3 requests already waiting \(max_queue_size 3\)"):
        loop.submit(new_job([5, 6, 7], max_tokens=4))
    assert time.monotonic() - began < 0.1 and loop.queue_depth == 3  # refused, not queued
    loop.start()
    for j in jobs:
        assert j.sender.done.wait(TIMEOUT_S) and j.sender.responses[-1][1] is None
    assert len(jobs[0].request.output_ids) == 4
    after = new_job([5, 6], max_tokens=2)
    loop.submit(after)  # capacity came back
    assert after.sender.done.wait(TIMEOUT_S) and len(after.request.output_ids) == 2


def test_200_requests_with_20_percent_cancelled_free_every_slot_and_the_rest_are_exact(serving, reference):
    """In-process: the real tiny engine under the Orchestrator, fake senders that cancel at random points
    (before admission, or after the 1st/2nd/3rd streamed response), fixed seed."""
    rng = random.Random(0)
    loop = serving(num_slots=4)
    cancelled = set(rng.sample(range(200), 40))
    jobs = []
    for i in range(200):
        sender = Sender(cancel_after=rng.choice([0, 1, 2, 3]) if i in cancelled else None)
        jobs.append(new_job(PROMPTS[i % len(PROMPTS)], sender=sender))
        loop.submit(jobs[-1])
    for j in jobs:
        assert j.sender.done.wait(TIMEOUT_S)
    dropped = 0
    for i, j in enumerate(jobs):
        outputs, error, final = j.sender.responses[-1]
        assert error is None and final
        if i not in cancelled:
            assert j.request.status is Status.FINISHED and streamed_ids(j) == reference[i % len(PROMPTS)]
        elif j.request.status is Status.CANCELLED:
            dropped += 1
            assert outputs is None and len(j.request.output_ids) < 12
    assert dropped >= 30  # most cancellations landed before the request's end
    loop.stop()  # after the step in flight: the engine's state is ours to read
    runtime = loop.engine.runtime
    assert runtime.free_slots == runtime.num_slots  # target KV and drafter context share the slot pool
    assert not loop.engine.running and not loop.engine.waiting


def test_a_fault_in_one_request_fails_that_request_only(serving, reference):
    loop = serving(num_slots=4)
    broken = new_job(PROMPTS[0], sender=Sender(broken=True))  # its client's connection is gone
    calls = 0
    detokenize = loop.engine.detokenize

    def faulty(ids):  # only requests with stop strings detokenize; fail after their prefill
        nonlocal calls
        calls += 1
        if calls > 1:
            raise UnicodeError("injected fault")
        return detokenize(ids)

    loop.engine.detokenize = faulty
    poisoned = new_job(PROMPTS[1], stop_strings=("w0 w0 w0",))
    healthy = [new_job(PROMPTS[i]) for i in range(2, 6)]
    for j in [broken, poisoned, *healthy]:
        loop.submit(j)
    for j in [broken, poisoned, *healthy]:
        assert j.sender.done.wait(TIMEOUT_S)
    assert poisoned.sender.responses[-1] == (None, "UnicodeError: injected fault", True)
    assert poisoned.request.status is Status.FAILED
    for i, j in enumerate(healthy, start=2):
        assert j.request.status is Status.FINISHED and streamed_ids(j) == reference[i]
    deadline = time.monotonic() + TIMEOUT_S
    while loop.active:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert broken.request.status is Status.CANCELLED  # dropped at the next step, its slot freed
    assert loop.engine.runtime.free_slots == 4


def test_a_failing_engine_pass_fails_its_requests_and_serving_goes_on(serving, reference):
    loop = serving(num_slots=2)
    forward, failures = loop.engine.runtime.target_forward, []

    def once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected device fault")
        return forward(*args, **kwargs)

    loop.engine.runtime.target_forward = once
    first = new_job(PROMPTS[0])
    loop.submit(first)
    assert first.sender.done.wait(TIMEOUT_S)
    assert first.sender.responses[-1] == (None, "RuntimeError: injected device fault", True)
    after = new_job(PROMPTS[3])
    loop.submit(after)
    assert after.sender.done.wait(TIMEOUT_S) and streamed_ids(after) == reference[3]
    assert loop.engine.runtime.free_slots == 2


# ---- corrupt or mismatched files fail at load, naming the file --------------------------------------------
def test_a_truncated_graph_or_a_manifest_hash_mismatch_fails_at_load_naming_the_file(engines, tmp_path):  # noqa: F811
    import json

    truncated = shutil.copytree(engines, tmp_path / "truncated")
    graph = truncated / "target.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    named = rf"^{re.escape(str(graph))}: graph 'target' does not match .*manifest.json: sha256 \w+\.\.\. "
    for load in (lambda: build_engine(EngineOptions(engines=str(truncated), check_files=True)),
                 lambda: TargetService(truncated, num_slots=1)):
        with pytest.raises(CorruptEngineError, match=named + rf"\({graph.stat().st_size} bytes\)"):
            load()

    edited = shutil.copytree(engines, tmp_path / "edited")
    manifest = json.loads((edited / "manifest.json").read_text())
    name = next(n for n in manifest["graphs"] if n != "target")
    manifest["graphs"][name]["sha256"] = "0" * 64
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptEngineError, match=rf"graph '{name}' does not match .* manifest says 0000000000000000"):
        DraftService(edited, num_slots=1)
    TargetService(edited, num_slots=1)  # the target graph itself is intact: its model loads


def test_a_truncated_checkpoint_fails_at_load_naming_the_file(pair, tmp_path):  # noqa: F811
    from dspark_trt.models.drafter_checkpoint import load_drafter

    draft = shutil.copytree(pair / "draft", tmp_path / "draft")
    weights = draft / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(DSparkError, match=rf"^{re.escape(str(weights))}: not a readable safetensors file \(.*"):
        load_drafter(draft)
