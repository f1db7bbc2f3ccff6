"""A real tritonserver (from the nvidia-pytriton wheel) serving python models that run in our venv."""
import importlib.util
import os
import queue
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import dspark_trt
from dspark_trt.errors import DSparkError
from dspark_trt.serving import tritonserver
from dspark_trt.serving.processes import SHM_DIR
from dspark_trt.serving.tritonserver import TritonServer

MODELS = Path(__file__).parent / "triton_models"
STREAM_TIMEOUT_S = 30


def make_repository(root: Path, *models: str) -> Path:
    """A model repository in root holding copies of the named fixture models."""
    repo = root / "repo"
    for name in models:
        shutil.copytree(MODELS / name, repo / name)
    return repo


def processes_using(path: Path) -> list[int]:
    """Pids whose command line mentions path (the server and its stubs name the repository)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    with TritonServer(make_repository(root, "warp", "counter"), workdir=root / "work") as running:
        yield running


def warp_inputs(module, logits: np.ndarray, temperature: float):
    inputs = [module.InferInput("LOGITS", list(logits.shape), "FP32"), module.InferInput("TEMPERATURE", [1], "FP32")]
    inputs[0].set_data_from_numpy(logits)
    inputs[1].set_data_from_numpy(np.array([temperature], np.float32))
    return inputs


def counter_inputs(start: int, count: int):
    import tritonclient.grpc as grpcclient

    inputs = [grpcclient.InferInput("START", [1], "INT32"), grpcclient.InferInput("COUNT", [1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([start], np.int32))
    inputs[1].set_data_from_numpy(np.array([count], np.int32))
    return inputs


def stream(server: TritonServer, requests: dict[str, tuple[int, int]]) -> dict[str, list]:
    """Send {request_id: (start, count)} on one gRPC stream; per request, the list of
    ("value", int) / ("final", None) / ("error", message) events in arrival order, up to its end."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        for request_id, (start, count) in requests.items():
            client.async_stream_infer("counter", counter_inputs(start, count), request_id=request_id,
                                      enable_empty_final_response=True)
        seen: dict[str, list] = {request_id: [] for request_id in requests}
        open_requests = set(requests)
        while open_requests:
            result, error = events.get(timeout=STREAM_TIMEOUT_S)
            if error is not None:  # errors carry no request id here; only one request may fail per call
                assert len(open_requests) == 1, f"error while several requests were open: {error}"
                request_id = open_requests.pop()
                seen[request_id].append(("error", error.message()))
                continue
            response = result.get_response()
            if response.outputs:
                seen[response.id].append(("value", int(result.as_numpy("VALUE")[0])))
            if response.parameters["triton_final_response"].bool_param:
                seen[response.id].append(("final", None))
                open_requests.discard(response.id)
        return seen
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.server
def test_plain_model_runs_numpy_torch_and_dspark_trt_over_http_and_grpc(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 11)) * 4).astype(np.float32)
    temperature = 0.7
    for module, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        client = module.InferenceServerClient(url)
        result = client.infer("warp", warp_inputs(module, logits, temperature))
        np.testing.assert_allclose(result.as_numpy("PROBS"), softmax(logits.astype(np.float64) / temperature),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(result.as_numpy("LOGSUMEXP"), np.logaddexp.reduce(logits.astype(np.float64), -1),
                                   rtol=1e-5)
        assert result.as_numpy("DSPARK_FILE")[0].decode() == dspark_trt.__file__  # our checkout, not a copy
        client.close()


@pytest.mark.server
def test_decoupled_model_streams_all_responses_in_order_then_the_final_flag(server):
    seen = stream(server, {"a": (5, 4), "b": (100, 3)})
    assert seen["a"] == [("value", 5), ("value", 6), ("value", 7), ("value", 8), ("final", None)]
    assert seen["b"] == [("value", 100), ("value", 101), ("value", 102), ("final", None)]


@pytest.mark.server
def test_bad_input_gets_an_error_and_the_server_keeps_serving(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(server.http_url)
    nan_logits = np.array([[0.0, np.nan, 1.0]], np.float32)
    with pytest.raises(InferenceServerException, match="LOGITS must be finite"):
        client.infer("warp", warp_inputs(httpclient, nan_logits, 1.0))
    wrong_type = [httpclient.InferInput("LOGITS", [1, 3], "INT32"), httpclient.InferInput("TEMPERATURE", [1], "FP32")]
    wrong_type[0].set_data_from_numpy(np.zeros((1, 3), np.int32))
    wrong_type[1].set_data_from_numpy(np.ones(1, np.float32))
    with pytest.raises(InferenceServerException, match="(?i)data.?type"):  # rejected by Triton itself
        client.infer("warp", wrong_type)
    assert stream(server, {"bad": (0, -1)})["bad"] == [("error", "COUNT must be >= 0, got -1")]

    good = np.array([[0.0, 1.0, 2.0]], np.float32)
    result = client.infer("warp", warp_inputs(httpclient, good, 1.0))
    np.testing.assert_allclose(result.as_numpy("PROBS"), softmax(good), rtol=1e-5)
    assert stream(server, {"after": (1, 2)})["after"] == [("value", 1), ("value", 2), ("final", None)]
    assert server.is_running()
    client.close()


@pytest.mark.server
def test_admin_apis_need_the_generated_key_and_inference_apis_do_not(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    for call in (http.get_model_repository_index, lambda: http.unload_model("warp"), http.get_log_settings,
                 http.get_system_shared_memory_status, grpc.get_model_repository_index, grpc.get_trace_settings):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    names = {m["name"] for m in http.get_model_repository_index(headers=server.admin_headers())}
    assert names == {"warp", "counter"}
    grpc_index = grpc.get_model_repository_index(headers=server.admin_headers(grpc=True))
    assert {m.name for m in grpc_index.models} == {"warp", "counter"}
    # model-control-mode=none: even with the key, models cannot be unloaded
    with pytest.raises(InferenceServerException, match="(?i)explicit|not allowed|polling"):
        http.unload_model("warp", headers=server.admin_headers())
    assert http.is_server_ready() and grpc.is_model_ready("warp")
    assert http.get_model_metadata("counter")["name"] == "counter"
    http.close()
    grpc.close()


@pytest.mark.server
def test_stop_frees_the_ports_and_leaves_no_server_or_stub_process(tmp_path):
    import tritonclient.http as httpclient

    repo = make_repository(tmp_path, "counter")
    server = TritonServer(repo, extra_args=["--exit-timeout-secs=3"])
    server.start()
    try:
        assert "exit_timeout                     | 3 " in server.log_path.read_text()  # extra_args win
        pids = processes_using(repo)
        assert len(pids) >= 2, "expected the server and one python stub"
        assert stream(server, {"x": (0, 2)})["x"] == [("value", 0), ("value", 1), ("final", None)]
        ports = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in (server.http_url, server.grpc_url,
                                                                      server.metrics_url)]
        assert not any(port_is_free(port) for port in ports)
        idle_client = httpclient.InferenceServerClient(server.http_url)  # a keep-alive connection left open
        assert idle_client.is_server_live()
        (stub,) = server.stubs.values()
        assert stub.instance == "counter_0_0" and (SHM_DIR / stub.shm_region).exists()
        os.kill(stub.pid, signal.SIGKILL)  # a killed stub never unlinks its shared memory
    finally:
        began = time.monotonic()
        server.stop()
    assert time.monotonic() - began < 10, "an idle client connection held up shutdown"
    assert not server.is_running()
    assert processes_using(repo) == []
    assert all(port_is_free(port) for port in ports)
    assert not server.log_path.parent.exists()  # its own temporary workdir is gone
    assert server.stubs == {} and not (SHM_DIR / stub.shm_region).exists()
    server.stop()  # idempotent


@pytest.mark.server
def test_a_model_that_fails_to_load_raises_with_the_server_log(tmp_path):
    repo = make_repository(tmp_path, "broken")
    server = TritonServer(repo, workdir=tmp_path / "work")
    with pytest.raises(DSparkError, match="(?s)exited with code.*broken-model-sentinel"):
        server.start(timeout_s=60)
    assert not server.is_running()
    assert processes_using(repo) == []
    assert server.log_path == tmp_path / "work" / "tritonserver.log"
    assert (tmp_path / "work" / "backends" / "python" / tritonserver.STUB_NAME).is_file()


def test_missing_pytriton_or_repository_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(DSparkError, match="is not a directory"):
        TritonServer(tmp_path / "nowhere")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DSparkError, match="nvidia-pytriton package is not installed"):
        tritonserver.find_tritonserver()
