"""Serving: stop words and streaming detokenisation, the orchestrator loop with fake senders, package,
and (marked server) the packaged tiny pair on a real tritonserver over gRPC and HTTP."""
import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_cli_spec import pair  # noqa: F401 - the tiny target + drafter fixture, shared

from dspark_trt.cli import main as cli_main
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.request import InvalidRequestError, SamplingParams, Status
from dspark_trt.errors import DSparkError
from dspark_trt.serving.bls_services import DraftService, TargetService
from dspark_trt.serving.cancellation import StopForwarder, new_request_key
from dspark_trt.serving.orchestrator import Job, Orchestrator
from dspark_trt.serving.ensemble import STEPS, client_fields, ensemble_steps
from dspark_trt.serving.package import MODELS, TEMPLATES, PackageOptions, package_repository
from dspark_trt.serving.request_parsing import parse_stop_request
from dspark_trt.serving.text import REPLACEMENT, decode_word_list, encode_word_list, new_text, stream_window

TIMEOUT_S = 60
NEVER = 11  # the drafter's mask token: the tiny target practically never emits it (an end_id that lets runs go long)


# ---- text helpers ----------------------------------------------------------------------------------
class ByteTokenizer:
    """One token per UTF-8 byte: the worst case for characters split across tokens."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_word_lists_use_tensorrt_llms_layout():
    class Fixed:
        def encode(self, text, add_special_tokens=False):
            return {"ab": [5, 6], "c": [9], " ": []}[text]

    array = encode_word_list(Fixed(), ["ab", "", "c"], "stop_words")
    np.testing.assert_array_equal(array, [[5, 6, 9], [2, 3, -1]])
    assert decode_word_list(array) == [[5, 6], [9]]
    assert encode_word_list(Fixed(), [""], "bad_words").shape == (2, 0) and decode_word_list(np.zeros((2, 0))) == []
    with pytest.raises(InvalidRequestError, match="^bad_words holds ' ', which the tokenizer turns into no token"):
        encode_word_list(Fixed(), ["ab", " "], "bad_words")  # it could never match


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_streamed_text_never_splits_a_multibyte_character(step):
    text = "héllo → 世界 🎉 ok ü"
    tokenizer, ids = ByteTokenizer(), list(text.encode("utf-8"))
    chunks, shown = [], 0
    for end in range(step, len(ids) + step, step):
        end = min(end, len(ids))
        window, prefix = stream_window(ids[:end], shown)
        chunks.append(new_text(tokenizer, window, prefix, final=end == len(ids)))
        shown = end
    assert "".join(chunks) == text
    assert not any(REPLACEMENT in c for c in chunks)
    assert sum(bool(c) for c in chunks) > 1  # it did stream


# ---- the orchestrator with fake senders ------------------------------------------------------------
class FakeSender:
    def __init__(self):
        self.responses: list[tuple[dict | None, str | None, bool]] = []
        self.cancelled = False
        self.done = threading.Event()


def respond(job, outputs, error, final):
    job.sender.responses.append((outputs, error, final))
    if final:
        job.sender.done.set()


@pytest.fixture(scope="module")
def engines(pair, tmp_path_factory):  # noqa: F811
    from dspark_trt.build.pipeline import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("engines")
    build_engines(BuildOptions(out=str(out), target=str(pair / "target"), draft=str(pair / "draft"),
                               max_seq_len=128), progress=lambda message: None)
    return out


@pytest.fixture
def orchestrator(engines):
    engine, _ = build_engine(EngineOptions(engines=str(engines), num_slots=2, check_files=True))
    loop = Orchestrator(engine, respond, lambda job: job.sender.cancelled)
    loop.start()
    yield loop
    loop.stop()


def job(prompt, stream=True, max_tokens=16, perf=False, **params):
    return Job(prompt_ids=prompt, params=SamplingParams(max_tokens=max_tokens, stop_ids=(NEVER,), **params),
               stream=stream, perf_metrics=perf, sender=FakeSender())


def test_orchestrator_streams_many_requests_through_one_engine(orchestrator):
    prompts = [[5, 6, 7], [8, 9], [10, 5, 6, 7], [2, 3]]  # more requests than slots: some wait
    jobs = [job(p, stream=i % 2 == 0, perf=True) for i, p in enumerate(prompts)]
    for j in jobs:
        orchestrator.submit(j)
    for j in jobs:
        assert j.sender.done.wait(TIMEOUT_S)
    for j in jobs:
        responses = j.sender.responses
        assert [final for _, _, final in responses] == [False] * (len(responses) - 1) + [True]
        assert all(error is None for _, error, _ in responses)
        ids = []
        for outputs, _, _ in responses:
            window, prefix = outputs["output_ids"][0].tolist(), int(outputs["prefix_length"][0, 0])
            assert window[:prefix] == ids[len(ids) - prefix:]  # the context window repeats shown ids
            ids += window[prefix:]
        assert ids == j.request.output_ids and len(ids) == 16  # max_tokens, as no stop id comes
        assert (len(responses) > 1) == j.stream
        last = responses[-1][0]
        assert int(last["total_draft_tokens"][0, 0]) == j.request.stats.draft_tokens_verified > 0
        assert int(last["total_accepted_draft_tokens"][0, 0]) == j.request.stats.draft_tokens_accepted
    assert orchestrator.engine.runtime.free_slots == 2


def test_orchestrator_cancels_and_refuses_bad_requests_without_stopping(orchestrator):
    long = job([5, 6, 7], max_tokens=100)
    orchestrator.submit(long)
    deadline = time.monotonic() + TIMEOUT_S
    while not long.sender.responses and time.monotonic() < deadline:
        time.sleep(0.01)
    long.sender.cancelled = True
    assert long.sender.done.wait(TIMEOUT_S)
    assert long.sender.responses[-1] == (None, None, True)  # the final flag alone
    assert len(long.request.output_ids) < 100

    bad = Job(prompt_ids=[], params=SamplingParams(max_tokens=4), stream=True, perf_metrics=False,
              sender=FakeSender())
    orchestrator.submit(bad)
    assert bad.sender.done.wait(TIMEOUT_S)
    assert bad.sender.responses == [(None, "prompt is empty: at least one token is needed", True)]

    after = job([5, 6], max_tokens=3)
    orchestrator.submit(after)
    assert after.sender.done.wait(TIMEOUT_S) and len(after.request.output_ids) == 3
    assert orchestrator.engine.runtime.free_slots == 2  # the cancelled request's slot came back


def test_a_stop_request_cancels_only_the_job_whose_responses_carry_its_key(orchestrator):
    victim, other = job([5, 6, 7], max_tokens=100), job([8, 9], max_tokens=40)
    orchestrator.submit(victim)
    orchestrator.submit(other)
    deadline = time.monotonic() + TIMEOUT_S
    while not (victim.sender.responses and other.sender.responses) and time.monotonic() < deadline:
        time.sleep(0.01)
    key = int(victim.sender.responses[0][0]["request_key"][0, 0])
    assert key == victim.key != int(other.sender.responses[0][0]["request_key"][0, 0])
    orchestrator.stop_request(key + 1)  # no such request (or one that has ended): nothing happens
    orchestrator.stop_request(key)
    assert victim.sender.done.wait(TIMEOUT_S) and other.sender.done.wait(TIMEOUT_S)
    assert victim.request.status is Status.CANCELLED and len(victim.request.output_ids) < 100
    assert other.request.status is Status.FINISHED and len(other.request.output_ids) == 40
    assert orchestrator.engine.runtime.free_slots == 2


def test_stop_requests_are_parsed_and_forwarded_once_per_key():
    assert parse_stop_request({"request_key": np.array([[7]], np.uint64)}) is None  # a generation request
    assert parse_stop_request({"stop": np.array([[False]])}) is None
    assert parse_stop_request({"stop": np.array([[True]]), "request_key": np.array([[2**63 - 1]], np.uint64)}) \
        == 2**63 - 1
    with pytest.raises(InvalidRequestError, match="^request_key is missing"):
        parse_stop_request({"stop": np.array([[True]])})
    with pytest.raises(InvalidRequestError, match="^request_key must be int-typed"):
        parse_stop_request({"stop": np.array([[True]]), "request_key": np.array([[1.5]], np.float32)})
    sent = []
    forwarder = StopForwarder(sent.append, remember=2)
    for key in (1, 1, 2, 1, 3, 1):  # 1 is forgotten once 2 and 3 came after it
        forwarder.cancelled(key)
    assert sent == [1, 2, 3, 1]
    assert len({new_request_key() for _ in range(1000)}) == 1000


def test_split_runtime_gives_the_in_process_tokens(engines):
    """dspark_bls's BlsRuntime over the dspark_target/dspark_draft services = OrtRuntime in one process,
    greedy and sampled."""
    services = {"dspark_target": TargetService(engines, num_slots=2), "dspark_draft": DraftService(engines, 2)}
    calls = []

    def call(model, inputs, outputs):
        calls.append((model, set(inputs)))
        return services[model]({k: v.copy() for k, v in inputs.items()})

    options = EngineOptions(engines=str(engines), num_slots=2, check_files=True)
    split, _ = build_engine(options, call=call)
    local, _ = build_engine(options)
    prompts = [[5, 6, 7], [8, 9], [10, 5, 6, 7]]
    controlled = dict(repetition_penalty=1.4, min_tokens=4, bad_words=((6, 7),), return_log_probs=True)
    for params in (SamplingParams(max_tokens=20, stop_ids=(NEVER,)),
                   SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=4, stop_ids=(NEVER,)),
                   SamplingParams(max_tokens=20, temperature=0.8, seed=4, stop_ids=(NEVER,), **controlled)):
        expected = local.generate(prompts, params)
        got = split.generate(prompts, params)
        assert [r.output_ids for r in got] == [r.output_ids for r in expected]
        assert [r.output_logprobs for r in got] == [r.output_logprobs for r in expected]
    assert {"dspark_target", "dspark_draft"} <= {model for model, _ in calls} and split.runtime.free_slots == 2
    # decode passes were verified inside dspark_target (its graph's DSparkVerify node)
    assert any(model == "dspark_target" and "draft_tokens" in names for model, names in calls)
    # each model loads its own graphs only (issue #18: lean serving)
    target = services["dspark_target"].runtime
    assert set(target.sessions) == {"target"} and target.drafter is None and target.tap_layers
    assert set(services["dspark_draft"].drafter.sessions) == {"draft", "context"}


def test_a_split_request_resuming_drafting_ships_one_steps_rows(engines):
    """Under a draft gate that finds drafting never pays and an engine without a context backlog, dspark_draft gets
    one extend-only call a step (no anchors, nothing back) for the requests with new rows, so a probe that resumes
    drafting after skipped steps carries none of their rows; the tokens are the in-process engine's and plain
    decoding's."""
    from dspark_trt.engine.engine import Engine
    from dspark_trt.runtimes.bls_runtime import BlsRuntime
    from dspark_trt.runtimes.ort_runtime import OrtRuntime
    from dspark_trt.spec.cost_table import CostTable
    from dspark_trt.spec.scheduler import make_scheduler

    services = {"dspark_target": TargetService(engines, num_slots=2), "dspark_draft": DraftService(engines, 2)}
    draft_calls = []

    def call(model, inputs, outputs):
        result = services[model]({k: v.copy() for k, v in inputs.items()})
        if model == "dspark_draft":
            draft_calls.append((inputs, result))
        return result

    table = CostTable([1, 8], [10.0, 10.0], draft_requests=[1, 8], draft_seconds=[10.0, 10.0])

    def gated(runtime):
        scheduler = make_scheduler("dspark", runtime.block_size, cost_table=table, min_predicted_gain=0.0)
        scheduler.gate.smoothing = 0.0  # no learning of step times: both engines take the same decisions
        # an extension on every skipped step (no backlog): the split's per-step cadence is what is checked here;
        # the default backlog's contract is tests/test_draft_gate.py's
        return Engine(runtime, scheduler, context_backlog=1)

    prompts, params = [[5, 6, 7], [8, 9, 10, 5, 6, 7, 8]], SamplingParams(max_tokens=24, stop_ids=(NEVER,))
    runtime = BlsRuntime(engines, call, num_slots=2)
    split = gated(runtime).generate(prompts, params)
    local = gated(OrtRuntime(engines, num_slots=2)).generate(prompts, params)
    plain = Engine(OrtRuntime(engines, num_slots=2, use_drafter=False)).generate(prompts, params)
    assert [r.output_ids for r in split] == [r.output_ids for r in local] == [r.output_ids for r in plain]
    assert [r.stats.round_accepted for r in split] == [r.stats.round_accepted for r in local]
    last, resumed = {}, 0  # each slot's latest call; drafts right after an extension
    for inputs, result in draft_calls:
        extend_only = "anchors" not in inputs
        assert (result == {}) == extend_only
        for slot, start, rows in zip(inputs["slots"], inputs["context_starts"], inputs["feature_counts"]):
            assert start == 0 or rows <= (runtime.block_size + 1) * extend_only  # a draft carries no backlog
            resumed += not extend_only and last.get(slot) == "extended"
            last[slot] = "extended" if extend_only else "drafted"
    assert resumed >= 2 and sum("anchors" not in inputs for inputs, _ in draft_calls) > 10


def test_extend_only_calls_overlap_the_target_pass_but_never_a_draft_call(engines):
    """BlsRuntime sends an extend-only call without waiting for it; the next dspark_draft call waits for it, so
    calls of dspark_draft never overlap and run in the order sent; one that fails fails the next drafting pass
    with a message naming it, and the engine serves on."""
    import threading
    import time

    from dspark_trt.engine.engine import Engine
    from dspark_trt.runtimes.bls_runtime import BlsRuntime
    from dspark_trt.spec.cost_table import CostTable
    from dspark_trt.spec.scheduler import make_scheduler

    services = {"dspark_target": TargetService(engines, num_slots=2), "dspark_draft": DraftService(engines, 2)}
    spans, overlapped, lock, fail, target_spans = [], [], threading.Lock(), {"at": None}, []

    def call(model, inputs, outputs):
        if model == "dspark_target":
            start = time.perf_counter()
            time.sleep(0.01)  # a pass of a real size: the helper thread gets the GIL within it even on a busy machine
            result = services[model]({k: v.copy() for k, v in inputs.items()})
            target_spans.append((start, time.perf_counter()))
            return result
        start = time.perf_counter()
        with lock:
            extend_only = "anchors" not in inputs
            if extend_only and len([s for s in spans if s[0]]) + 1 == fail["at"]:
                spans.append((True, start, start))
                raise RuntimeError("stub died")
        if extend_only:
            time.sleep(0.02)  # slower than a target pass of these tiny engines: the overlap must show
        result = services[model]({k: v.copy() for k, v in inputs.items()})
        with lock:
            overlapped.append(any(end > start for _, _, end in spans))
            spans.append((extend_only, start, time.perf_counter()))
        return result

    table = CostTable([1, 8], [10.0, 10.0], draft_requests=[1, 8], draft_seconds=[10.0, 10.0])
    scheduler = make_scheduler("dspark", 7, cost_table=table, min_predicted_gain=0.0)
    engine = Engine(BlsRuntime(engines, call, num_slots=2), scheduler, context_backlog=1)  # an extension a step
    params = SamplingParams(max_tokens=16, stop_ids=(NEVER,))
    plain = Engine(BlsRuntime(engines, call, num_slots=2, use_drafter=False)).generate([[5, 6, 7]], params)
    got = engine.generate([[5, 6, 7]], params)
    assert got[0].output_ids == plain[0].output_ids and not any(overlapped)
    extensions = [(start, end) for extend_only, start, end in spans if extend_only]
    assert len(extensions) > 3  # the gate skipped: contexts were extended, while the target ran its next pass
    overlapping = [any(t0 < end and start < t1 for t0, t1 in target_spans) for start, end in extensions]
    assert any(overlapping)  # sent and awaited in line, none could overlap a target pass

    spans.clear()
    fail["at"] = 2
    failed, after = engine.generate([[5, 6, 7], [8, 9]], params), engine.generate([[5, 6, 7]], params)
    assert any("extending the drafter's context failed: stub died" in (r.error or "") for r in failed)
    assert after[0].output_ids == plain[0].output_ids and engine.runtime.free_slots == 2


STUB_IMPORTS = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])  # triton_python_backend_utils, as the stub has it
spec = importlib.util.spec_from_file_location("model", sys.argv[2])
model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model)
config = {"parameters": {"tokenizer_dir": {"string_value": sys.argv[3]}}}
model.TritonPythonModel().initialize({"model_config": json.dumps(config)})
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("model", ["preprocessing", "postprocessing"])
def test_the_tokenizing_models_load_without_torch(engines, model):
    """Lean serving (issue #18): a Python stub that only tokenizes imports no torch (about 250 MB each).
    Its model.py is imported and initialized the way Triton's stub does, in a process of its own."""
    import subprocess
    import sys
    from pathlib import Path

    from dspark_trt.serving.tritonserver import find_tritonserver

    model_py = Path(__file__).parents[1] / "triton_repo" / model / "1" / "model.py"
    out = subprocess.run([sys.executable, "-c", STUB_IMPORTS, str(find_tritonserver().backends_dir / "python"),
                          str(model_py), str(engines / "tokenizer")], capture_output=True, text=True, check=True)
    modules = set(json.loads(out.stdout.splitlines()[-1]))
    assert "transformers" in modules and "torch" not in modules


# ---- package -------------------------------------------------------------------------------------------
def test_package_fills_every_template_and_rejects_bad_options(engines, tmp_path):
    repo = package_repository(PackageOptions(engines=str(engines), out=str(tmp_path / "repo"), schedule="fixed",
                                             block_size=2, num_slots=3, max_queue_size=7))
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODELS)
    for model in MODELS:
        config = (repo / model / "config.pbtxt").read_text()
        assert "${" not in config and "max_batch_size: " in config
    bls = (repo / "dspark_bls" / "config.pbtxt").read_text()
    for key, value in (("engine_dir", str(engines.resolve())), ("gamma", "2"), ("num_slots", "3"),
                       ("max_queue_size", "7"), ("schedule", "fixed")):
        assert f'key: "{key}" value {{ string_value: "{value}" }}' in bls
    assert (repo / "dspark_bls" / "1" / "model.py").is_file()
    assert 'string_value: "3"' in (repo / "dspark_target" / "config.pbtxt").read_text()  # same slots everywhere
    plain = package_repository(PackageOptions(engines=str(engines), out=str(tmp_path / "plain"), schedule="off"))
    assert not (plain / "dspark_draft").exists()  # target alone: no drafter model to load

    def bad(match, **changes):
        options = dict(engines=str(engines), out=str(tmp_path / "other"), schedule="fixed") | changes
        with pytest.raises(DSparkError, match=match):
            package_repository(PackageOptions(**options))

    bad("already exists", out=str(repo))
    bad("gamma must be in 0..4", block_size=9)
    bad("cost-table .* does not exist", schedule="dspark", cost_table=str(tmp_path / "missing.json"))
    bad("--calibration .* does not exist", calibration=str(tmp_path / "none.json"))
    bad("--num-slots must be >= 1", num_slots=0)
    bad("no manifest.json", engines=str(tmp_path))


def test_the_ensemble_steps_follow_the_one_rename_table():
    """The ensemble's steps come from serving/ensemble.py's table: a client tensor a step reads or writes is one
    the ensemble declares, a tensor between steps is made by an earlier step, and errors name client fields."""
    config = (TEMPLATES / "ensemble" / "config.pbtxt").read_text()
    declared = set(re.findall(r'\{ name: "(\w+)"', config))
    made = set()
    for model, inputs, outputs in STEPS:
        for tensor in inputs.values():
            assert tensor in (made if tensor.startswith("_") else declared), (model, tensor)
        assert all(t in declared for t in outputs.values() if not t.startswith("_")), model
        made |= set(outputs.values())
    assert "${ensemble_steps}" in config and 'input_map { key: "request_output_len" value: "max_tokens" }' in \
        ensemble_steps()
    assert client_fields("dspark_bls")["input_ids"] == "text_input"
    assert client_fields("preprocessing")["STOP_WORDS_DICT"] == "stop_words"


# ---- a real tritonserver ---------------------------------------------------------------------------------
def tensor(module, name, value, dtype):
    kinds = {"BYTES": np.object_, "INT32": np.int32, "BOOL": np.bool_, "FP32": np.float32, "UINT64": np.uint64}
    array = np.array([[value]], dtype=kinds[dtype])
    t = module.InferInput(name, [1, 1], dtype)
    t.set_data_from_numpy(array)
    return t


def ensemble_inputs(module, text, max_tokens, stream=False, **extra):
    inputs = [tensor(module, "text_input", text.encode(), "BYTES"),
              tensor(module, "max_tokens", max_tokens, "INT32"), tensor(module, "stream", stream, "BOOL")]
    for name in ("stop_words", "bad_words"):
        words = extra.pop(name, None)
        if words is not None:
            inputs.append(module.InferInput(name, [1, len(words)], "BYTES"))
            inputs[-1].set_data_from_numpy(np.array([[w.encode() for w in words]], dtype=np.object_))
    types = {"end_id": "INT32", "temperature": "FP32", "return_perf_metrics": "BOOL", "seed": "UINT64",
             "repetition_penalty": "FP32", "presence_penalty": "FP32", "frequency_penalty": "FP32",
             "min_tokens": "INT32", "return_log_probs": "BOOL"}
    return inputs + [tensor(module, k, v, types[k]) for k, v in extra.items()]


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    from dspark_trt.serving.tritonserver import TritonServer

    root = tmp_path_factory.mktemp("served")
    repo = package_repository(PackageOptions(engines=str(engines), out=str(root / "repo"), schedule="fixed",
                                                      num_slots=4))
    with TritonServer(repo, workdir=root / "work") as running:
        yield running


def grpc_stream(server, requests: dict[str, dict]) -> dict[str, list]:
    """Send {request_id: ensemble kwargs} on one stream; per request the ("text", str) / ("final",) /
    ("error", message) events up to its end, perf outputs as ("perf", dict), log-probs as ("logprobs", the
    response's output_log_probs, cum_log_probs)."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    seen = {request_id: [] for request_id in requests}
    try:
        for request_id, kwargs in requests.items():
            client.async_stream_infer("ensemble", ensemble_inputs(grpcclient, **kwargs), request_id=request_id,
                                      enable_empty_final_response=True)
        open_requests = set(requests)
        while open_requests:
            result, error = events.get(timeout=TIMEOUT_S)
            if error is not None:
                assert len(open_requests) == 1, f"error while several requests were open: {error}"
                seen[open_requests.pop()].append(("error", error.message()))
                continue
            response = result.get_response()
            names = {o.name for o in response.outputs}
            if "text_output" in names:
                seen[response.id].append(("text", result.as_numpy("text_output").reshape(-1)[0].decode()))
            if "total_draft_tokens" in names:
                seen[response.id].append(("perf", {n: result.as_numpy(n).item() for n in names
                                                   if n.startswith(("total_", "acceptance"))}))
            if "output_log_probs" in names:
                seen[response.id].append(("logprobs", result.as_numpy("output_log_probs").reshape(-1).tolist(),
                                          result.as_numpy("cum_log_probs").item()))
            if response.parameters["triton_final_response"].bool_param:
                seen[response.id].append(("final",))
                open_requests.discard(response.id)
        return seen
    finally:
        client.stop_stream()
        client.close()


def text_of(events) -> str:
    return "".join(e[1] for e in events if e[0] == "text")


def http_post(http_url: str, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{http_url}/v2/models/ensemble/{path}", json.dumps(body).encode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def model_stats(server, model: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as response:
        return json.loads(response.read())["model_stats"][0]


def metrics(server) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(server.metrics_url, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("dspark_")}


def cancel_first_response(server, prompt_ids: list[int], max_tokens: int) -> None:
    """Stream from dspark_bls directly and cancel the stream once the first tokens arrive."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put(error))
    ids = grpcclient.InferInput("input_ids", [1, len(prompt_ids)], "INT32")
    ids.set_data_from_numpy(np.asarray([prompt_ids], np.int32))
    inputs = [ids, tensor(grpcclient, "request_output_len", max_tokens, "INT32"),
              tensor(grpcclient, "streaming", True, "BOOL"), tensor(grpcclient, "end_id", NEVER, "INT32")]
    client.async_stream_infer("dspark_bls", inputs, request_id="gone")
    assert events.get(timeout=TIMEOUT_S) is None
    client.stop_stream(cancel_requests=True)
    client.close()


def wait_for_cancelled(server, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while metrics(server).get('dspark_requests{outcome="cancelled"}', 0) < count:
        assert time.monotonic() < deadline, "the cancelled stream was never dropped by the engine"
        time.sleep(0.05)


@pytest.mark.server
def test_greedy_served_text_equals_generate_over_grpc_and_http(server, pair, capsys):  # noqa: F811
    prompts = [json.loads(line)["turns"][0] for line in (pair / "prompts.jsonl").read_text().splitlines()][:4]
    assert cli_main(["generate", "--target", str(pair / "target"), "--draft", str(pair / "draft"), "--schedule",
                     "fixed", "--max-tokens", "12", "--json", *[a for p in prompts for a in ("--prompt", p)]]) == 0
    expected = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    streamed = grpc_stream(server, {str(i): dict(text=p, max_tokens=12, stream=True) for i, p in enumerate(prompts)})
    unary = grpc_stream(server, {str(i): dict(text=p, max_tokens=12) for i, p in enumerate(prompts)})
    for i, prompt in enumerate(prompts):
        assert text_of(streamed[str(i)]) == expected[i]
        assert [e[0] for e in unary[str(i)]] == ["text", "final"] and text_of(unary[str(i)]) == expected[i]
        status, body = http_post(server.http_url, "generate", {"text_input": prompt, "max_tokens": 12})
        assert status == 200 and json.loads(body)["text_output"] == expected[i]
        status, body = http_post(server.http_url, "generate_stream",
                                 {"text_input": prompt, "max_tokens": 12, "stream": True})
        chunks = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
        assert status == 200 and "".join(c["text_output"] for c in chunks) == expected[i]


@pytest.mark.server
def test_a_gated_server_gives_the_drafter_its_context_in_extend_only_calls(engines, pair, tmp_path, capsys):  # noqa: F811
    """Served under a draft gate that finds drafting never pays: at the steps it skips, dspark_bls extends the
    drafter's context by extend-only dspark_draft calls (no anchors, no outputs), which Triton takes; a probe then
    drafts from a whole context, and greedy text equals plain decoding."""
    from conftest import packaged_server
    from dspark_trt.spec.cost_table import CostTable

    table = tmp_path / "never_pays.json"
    CostTable([1, 8], [10.0, 10.0], draft_requests=[1, 8], draft_seconds=[10.0, 10.0]).to_json(table)
    prompts = [json.loads(line)["turns"][0] for line in (pair / "prompts.jsonl").read_text().splitlines()][:3]
    assert cli_main(["generate", "--no-spec", "--target", str(pair / "target"), "--max-tokens", "64", "--min-tokens",
                     "64", "--json", *[a for p in prompts for a in ("--prompt", p)]]) == 0  # no early end
    expected = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    with packaged_server(engines, tmp_path, schedule="dspark", cost_table=str(table), num_slots=4) as served:
        got = grpc_stream(served, {str(i): dict(text=p, max_tokens=64, min_tokens=64, stream=True)
                                   for i, p in enumerate(prompts)})
        gate = metrics(served)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        triton = opener.open(served.metrics_url, timeout=10).read().decode()
    assert [text_of(got[str(i)]) for i in range(len(prompts))] == expected
    [calls] = [float(line.rsplit(" ", 1)[1]) for line in triton.splitlines()
               if line.startswith('nv_inference_request_success{model="dspark_draft"')]
    drafts = sum(gate[f'dspark_draft_gate_steps{{decision="{d}"}}'] for d in ("draft", "probe"))
    assert gate['dspark_draft_gate_steps{decision="skip"}'] > 5 and drafts > 0
    # the skipped steps' extend-only calls (one per four blocks' rows of backlog), besides the probes' draft calls
    assert calls >= drafts + 3
    assert 'nv_inference_request_failure{model="dspark_draft",reason="BACKEND",version="1"} 0' in triton


@pytest.mark.server
def test_eight_concurrent_streams_arrive_in_pieces_with_perf_metrics_and_final_flags(server):
    before = metrics(server)
    requests = {f"r{i}": dict(text=f"w{5 + i % 6} w{6 + i % 5}", max_tokens=24, stream=True, end_id=NEVER,
                              return_perf_metrics=True) for i in range(8)}
    seen = grpc_stream(server, requests)
    for events in seen.values():
        kinds = [e[0] for e in events]
        assert kinds[-1] == "final" and kinds.count("final") == 1 and "error" not in kinds
        assert kinds.count("text") > 2  # tokens arrived as they were committed, not at the end
        perf = [e[1] for e in events if e[0] == "perf"][-1]
        assert perf["total_draft_tokens"] > 0 and 0 <= perf["total_accepted_draft_tokens"] <= perf["total_draft_tokens"]
        rate = perf["total_accepted_draft_tokens"] / perf["total_draft_tokens"]
        assert perf["acceptance_rate"] == pytest.approx(rate)
        assert 0 < len(text_of(events).split()) <= 24  # one word per token; the eos word w1 is a special token
    after = metrics(server)
    assert after['dspark_requests{outcome="finished"}'] - before.get('dspark_requests{outcome="finished"}', 0) == 8
    assert after["dspark_generation_tokens"] - before.get("dspark_generation_tokens", 0) == 8 * 24
    assert after["dspark_spec_decode_num_draft_tokens"] > before.get("dspark_spec_decode_num_draft_tokens", 0)
    grew = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    per_pos = [grew(f'dspark_spec_decode_num_accepted_tokens_per_pos{{position="{k}"}}') for k in range(4)]
    # an accepted draft at position k counts once at k: the positions add up to the accepted drafts
    assert sum(per_pos) == grew("dspark_spec_decode_num_accepted_tokens") > 0 and per_pos == sorted(per_pos)[::-1]
    for model in ("dspark_target", "dspark_draft"):  # the orchestrator reached both by BLS
        assert model_stats(server, model)["execution_count"] > 0


@pytest.mark.server
def test_stop_words_end_the_output_at_the_word(server):
    request = dict(text="w5 w6", max_tokens=16, end_id=NEVER)  # a prompt whose answer has several words
    words = text_of(grpc_stream(server, {"free": request})["free"]).split()
    stop = next(w for w in words[2:] if words.index(w) >= 2)  # a word that first appears third or later
    cut = words[: words.index(stop) + 1]
    stopped = grpc_stream(server, {"stop": dict(request, stop_words=[stop, ""]),
                                   "other": dict(request, stop_words=["w0"])})
    assert text_of(stopped["stop"]).split() == cut and len(cut) < len(words)
    assert text_of(stopped["other"]).split() == words  # a word never generated changes nothing


@pytest.mark.server
def test_each_logit_control_and_log_probs_over_grpc_and_http(server, engines):
    """Each control once, streamed over gRPC and unary over HTTP, served with speculation: the text plain decoding
    gives in-process with the same controls (and not the uncontrolled text); log-probs match it too."""
    from dspark_trt.engine.prompts import chat_prompt_ids

    local, tokenizer = build_engine(EngineOptions(engines=str(engines), schedule="off", check_files=True))

    def plain_decoding(end_id=NEVER, bad_words=(), **controls):
        words = decode_word_list(encode_word_list(tokenizer, list(bad_words), "bad_words"))
        params = SamplingParams(max_tokens=16, stop_ids=(end_id,), bad_words=tuple(map(tuple, words)), **controls)
        return local.generate([chat_prompt_ids(tokenizer, "w5 w6")], params)[0]

    request = dict(text="w5 w6", max_tokens=16, end_id=NEVER)
    free = text_of(grpc_stream(server, {"free": request})["free"]).split()
    end = int(free[2][1:])  # the third word's id: as end_id, min_tokens holds it back
    cases = {"repetition": dict(repetition_penalty=1.5), "presence": dict(presence_penalty=1.0),
             "frequency": dict(frequency_penalty=0.7), "min_tokens": dict(min_tokens=10, end_id=end),
             "bad_words": dict(bad_words=[free[0], f"{free[1]} {free[2]}", ""]),
             "log_probs": dict(return_log_probs=True)}
    streamed = grpc_stream(server, {name: dict(request, stream=True, **c) for name, c in cases.items()})
    for name, controls in cases.items():
        expected = plain_decoding(**controls)
        text = tokenizer.decode(expected.output_ids, skip_special_tokens=True)
        assert text_of(streamed[name]) == text, name
        status, body = http_post(server.http_url, "generate", {"text_input": "w5 w6", "max_tokens": 16,
                                                               "end_id": NEVER, **controls})
        assert status == 200 and json.loads(body)["text_output"] == text, (name, body)
        if name == "log_probs":
            chunks = [e for e in streamed[name] if e[0] == "logprobs"]
            assert len(chunks) > 1
            assert [lp for c in chunks for lp in c[1]] == pytest.approx(expected.output_logprobs, abs=1e-4)
            assert chunks[-1][2] == pytest.approx(sum(expected.output_logprobs), abs=1e-3)
            assert json.loads(body)["output_log_probs"] == pytest.approx(expected.output_logprobs, abs=1e-4)
        elif name == "min_tokens":  # without it the end id comes early
            assert len(plain_decoding(end_id=end).output_ids) < 10 <= len(expected.output_ids)
            assert end not in expected.output_ids[:10]
        else:
            assert text.split() != free, name
    assert not any(e[0] == "logprobs" for e in streamed["repetition"])  # only when asked for


@pytest.mark.server
def test_bad_requests_name_the_field_cancelled_streams_free_their_slot_and_serving_goes_on(server):
    seen = grpc_stream(server, {"zero": dict(text="w5", max_tokens=0, stream=True)})
    assert seen["zero"][0][0] == "error" and "max_tokens" in seen["zero"][0][1]
    seen = grpc_stream(server, {"cold": dict(text="w5", max_tokens=4, temperature=-1.0)})
    assert seen["cold"][0][0] == "error" and "temperature" in seen["cold"][0][1]
    status, body = http_post(server.http_url, "generate", {"text_input": "w5", "max_tokens": 0})
    assert status >= 400 and "max_tokens" in body

    cancelled = metrics(server).get('dspark_requests{outcome="cancelled"}', 0)
    finished = metrics(server).get('dspark_requests{outcome="finished"}', 0)
    cancel_first_response(server, [5, 6, 7], max_tokens=100)  # on dspark_bls directly
    wait_for_cancelled(server, cancelled + 1)
    assert metrics(server)["dspark_num_requests_running"] == 0  # its slot is free again
    assert metrics(server).get('dspark_requests{outcome="finished"}', 0) == finished
    ok = grpc_stream(server, {"ok": dict(text="w5 w6", max_tokens=5, stream=True, end_id=NEVER)})["ok"]
    assert ok[-1] == ("final",) and 0 < len(text_of(ok).split()) <= 5


def cancel_ensemble_streams(server, max_tokens: int) -> None:
    """Through the ensemble: cancel a gRPC stream after its first text, and leave an HTTP generate_stream
    after its first chunk (the client closes the connection)."""
    import http.client

    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put(error))
    client.async_stream_infer("ensemble", ensemble_inputs(grpcclient, "w5 w6", max_tokens, stream=True, end_id=NEVER))
    assert events.get(timeout=TIMEOUT_S) is None
    client.stop_stream(cancel_requests=True)
    client.close()
    host, port = server.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    body = {"text_input": "w6 w5", "max_tokens": max_tokens, "stream": True, "end_id": NEVER}
    connection.request("POST", "/v2/models/ensemble/generate_stream", json.dumps(body))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()


@pytest.mark.server
def test_clients_that_cancel_or_leave_an_ensemble_stream_free_their_slots(server):
    """Triton 2.51's ensemble never cancels its running dspark_bls step; postprocessing sees the later
    windows cancelled and stops the request by key (serving/cancellation.py). Without that both
    requests would run to their end and count as finished."""
    before = metrics(server)
    start = time.monotonic()
    full = grpc_stream(server, {"full": dict(text="w5 w6", max_tokens=100, stream=True, end_id=NEVER)})["full"]
    seconds = time.monotonic() - start
    assert full[-1] == ("final",)
    assert metrics(server)["dspark_generation_tokens"] - before.get("dspark_generation_tokens", 0) == 100
    start = time.monotonic()
    cancel_ensemble_streams(server, max_tokens=100)
    wait_for_cancelled(server, before.get('dspark_requests{outcome="cancelled"}', 0) + 2)
    print(f"full run {seconds:.2f}s; both cancelled after {time.monotonic() - start:.2f}s")
    after = metrics(server)
    assert after['dspark_requests{outcome="finished"}'] == before.get('dspark_requests{outcome="finished"}', 0) + 1
    assert after["dspark_num_requests_running"] == 0
    ok = grpc_stream(server, {"ok": dict(text="w5 w6", max_tokens=5, stream=True, end_id=NEVER)})["ok"]
    assert ok[-1] == ("final",) and 0 < len(text_of(ok).split()) <= 5


def test_serve_and_package_commands_name_bad_arguments(tmp_path, capsys):
    assert cli_main(["serve", "--repo", str(tmp_path)]) == 2
    assert "is not a dspark-trt model repository" in capsys.readouterr().err
    assert cli_main(["serve", "--repo", str(tmp_path), "--http-port", "70000"]) == 2
    assert "--http-port must be in 1..65535" in capsys.readouterr().err
    assert cli_main(["package", "--engines", str(tmp_path), "--out", str(tmp_path / "repo")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.server
def test_serve_prints_how_to_call_it_and_stops_cleanly_on_sigterm(engines, tmp_path):
    import signal
    import subprocess
    import sys

    from dspark_trt.serving.tritonserver import free_ports

    repo = package_repository(PackageOptions(engines=str(engines), out=str(tmp_path / "repo"), schedule="off"))
    http, grpc, metrics_port, supervisor = free_ports("127.0.0.1", 4)
    process = subprocess.Popen([sys.executable, "-m", "dspark_trt", "serve", "--repo", str(repo), "--http-port",
                                str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics_port),
                                "--supervisor-port", str(supervisor)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = [process.stdout.readline() for _ in range(8)]
        assert any("is serving model 'ensemble'" in line for line in banner), banner
        assert any(f"127.0.0.1:{http}/v2/models/ensemble/generate_stream" in line for line in banner)
        assert any(f"127.0.0.1:{supervisor}/live" in line for line in banner)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert opener.open(f"http://127.0.0.1:{supervisor}/live", timeout=10).status == 200
        status, body = http_post(f"127.0.0.1:{http}", "generate", {"text_input": "w5 w6", "max_tokens": 3})
        assert status == 200 and "text_output" in json.loads(body)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "stopping tritonserver" in process.stderr.read()
    finally:
        process.kill()


def test_a_cached_default_build_of_an_older_dspark_trt_is_rebuilt(engines, pair, tmp_path, monkeypatch,  # noqa: F811
                                                                   capsys):
    """`serve`'s cached default engines: a current build is reused; one an older dspark-trt made (its manifest
    lacks a graph this one runs: the drafter's `context`) is built afresh, not reused to fail at load."""
    import shutil

    from dspark_trt.graphs.manifest import read_manifest, write_manifest
    from dspark_trt.serving.default_pair import default_engines

    builds = []

    def build(options, progress=None):  # build-engines, as fast as a copy
        builds.append(options.out)
        shutil.copytree(engines, options.out)

    monkeypatch.setattr("dspark_trt.build.pipeline.build_engines", build)
    cached = default_engines("smollm2", "default", str(tmp_path))
    assert "building engines" in capsys.readouterr().err and len(builds) == 1
    assert default_engines("smollm2", "default", str(tmp_path)) == cached and len(builds) == 1
    manifest = read_manifest(cached)
    del manifest["graphs"]["context"]
    write_manifest(cached, manifest)
    assert default_engines("smollm2", "default", str(tmp_path)) == cached and len(builds) == 2
    assert "building engines" in capsys.readouterr().err and "context" in read_manifest(cached)["graphs"]
    drafter = tmp_path / "drafter"  # a drafter whose weights change (a new shipped `default`) is built afresh
    shutil.copytree(pair / "draft", drafter)
    first = default_engines("smollm2", str(drafter), str(tmp_path))
    (drafter / "model.safetensors").write_bytes((drafter / "model.safetensors").read_bytes() + b" ")
    assert default_engines("smollm2", str(drafter), str(tmp_path)) != first and len(builds) == 4


@pytest.mark.slow
@pytest.mark.server
def test_serve_without_repo_speculates_with_dspark_and_profiles_its_cost_table_once(  # noqa: F811
        pair, tmp_path, monkeypatch, capsys):
    """What `make serve` runs, on the tiny pair: the engines built, the dspark schedule with a cost table profiled
    on the first start and said so, greedy served text = plain decoding; the next start reads the table from the
    cache; --no-spec packages the target alone."""
    import signal
    import subprocess
    import sys

    from dspark_trt.serving.default_pair import default_options, default_repository
    from dspark_trt.serving.tritonserver import free_ports

    monkeypatch.setenv("DSPARK_TRT_CACHE", str(tmp_path / "cache"))
    prompts = [json.loads(line)["turns"][0] for line in (pair / "prompts.jsonl").read_text().splitlines()][:3]
    assert cli_main(["generate", "--no-spec", "--target", str(pair / "target"), "--max-tokens", "12", "--json",
                     *[a for p in prompts for a in ("--prompt", p)]]) == 0
    expected = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    target, draft, cache_dir = str(pair / "target"), str(pair / "draft"), str(tmp_path / "serve")
    http, grpc, metrics_port, supervisor = free_ports("127.0.0.1", 4)
    process = subprocess.Popen([sys.executable, "-m", "dspark_trt", "serve", "--target", target, "--draft", draft,
                                "--cache-dir", cache_dir, "--http-port", str(http),
                                "--grpc-port", str(grpc), "--metrics-port", str(metrics_port),
                                "--supervisor-port", str(supervisor)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = [process.stdout.readline() for _ in range(8)]
        assert any("is serving model 'ensemble'" in line for line in banner), banner
        for prompt, text in zip(prompts, expected):
            status, body = http_post(f"127.0.0.1:{http}", "generate", {"text_input": prompt, "max_tokens": 12})
            assert status == 200 and json.loads(body)["text_output"] == text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        log = process.stderr.read()
    finally:
        process.kill()
    [entry] = (tmp_path / "cache" / "cost-tables").glob("*.json")
    assert "schedule dspark with the draft gate (steps where drafting cannot pay decode plainly); " \
           f"cost table {entry} (freshly profiled)" in log
    [config] = (tmp_path / "serve").glob("repo-*/dspark_bls/config.pbtxt")
    assert 'key: "schedule" value { string_value: "dspark" }' in config.read_text()
    assert f'key: "cost_table" value {{ string_value: "{entry}" }}' in config.read_text()
    stamp = entry.stat().st_mtime_ns
    default_repository(default_options(target, draft, cache_dir))  # the next start
    assert f"cost table {entry} (cached)" in capsys.readouterr().err and entry.stat().st_mtime_ns == stamp
    repo = default_repository(default_options(target, draft, cache_dir, "off"))  # --no-spec
    assert "SPECULATION OFF" in capsys.readouterr().err and not (repo / "dspark_draft").exists()
    assert 'key: "schedule" value { string_value: "off" }' in (repo / "dspark_bls" / "config.pbtxt").read_text()
