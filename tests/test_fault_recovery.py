"""Faults on a real tritonserver under the supervisor that `dspark-trt serve` runs: each model process, and
tritonserver itself, is SIGKILLed while a stream is running. Each test asserts how that stream ends, that
the server reports not ready until it has recovered while the supervisor's liveness stays up, the recovery
time, the text after it (the same greedy text as before any fault), the fault metrics, every slot free and
the dead server's shared memory removed.

One server serves the whole module (the faults follow one another, each test leaves it recovered)."""
import json
import os
import queue
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_cli_spec import pair  # noqa: F401 - the tiny target + drafter fixture, shared
from test_triton_serving import NEVER, ensemble_inputs, http_post

from dspark_trt.serving.bls_services import RECOVERING, STOPPING
from dspark_trt.serving.health_endpoint import HealthEndpoint
from dspark_trt.serving.package import PackageOptions, package_repository
from dspark_trt.serving.processes import SHM_DIR, python_stubs
from dspark_trt.serving.supervisor import Supervisor
from dspark_trt.serving.tritonserver import TritonServer, http_status

pytestmark = pytest.mark.server

DEPLOYMENT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "deployment.yaml"
RECOVERY_LIMIT_S = 150  # the bound asserted here (2 busy cores); docs/recovery.md has the times measured
STREAM_TOKENS = 480  # long enough (engines of 512 positions) to be running when the kill lands
PROMPT = "w5 w6"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Served:
    server: TritonServer
    supervisor: Supervisor
    endpoint: HealthEndpoint
    expected: str  # the greedy text of PROMPT before any fault

    @property
    def supervisor_url(self) -> str:
        return f"http://127.0.0.1:{self.endpoint.port}"


@pytest.fixture(scope="module")
def served(pair, tmp_path_factory):  # noqa: F811
    from dspark_trt.build.pipeline import BuildOptions, build_engines

    root = tmp_path_factory.mktemp("faults")
    build_engines(BuildOptions(out=str(root / "engines"), target=str(pair / "target"), draft=str(pair / "draft"),
                               max_seq_len=512), progress=lambda message: None)
    repo = package_repository(PackageOptions(engines=str(root / "engines"), out=str(root / "repo"), schedule="fixed",
                                             num_slots=2))
    server = TritonServer(repo, workdir=root / "work")
    supervisor = Supervisor(server, log=lambda message: print(f"supervisor: {message}"))
    endpoint = HealthEndpoint(supervisor)
    stop = threading.Event()
    watcher = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
    endpoint.start()
    supervisor.start()
    watcher.start()
    try:
        yield Served(server, supervisor, endpoint, expected=generate(server))
    finally:
        stop.set()
        watcher.join(timeout=60)
        server.stop()
        endpoint.stop()


def generate(server: TritonServer) -> str:
    status, body = http_post(server.http_url, "generate", {"text_input": PROMPT, "max_tokens": 12, "end_id": NEVER})
    assert status == 200, body
    return json.loads(body)["text_output"]


def metric_values(served: Served) -> dict[str, float]:
    """Every series the supervisor's /metrics serves (its own, then tritonserver's)."""
    with _NO_PROXY.open(f"{served.supervisor_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


class HealthLog:
    """Samples, every 0.1 s from start() to stop(): tritonserver's ready, ensemble-ready and live endpoints and
    the supervisor's /live (True when 200)."""

    def __init__(self, served: Served):
        base = f"http://{served.server.http_url}/v2"
        self.urls = {"ready": f"{base}/health/ready", "ensemble": f"{base}/models/ensemble/ready",
                     "live": f"{base}/health/live", "supervisor_live": f"{served.supervisor_url}/live"}
        self.samples: list[dict[str, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append({name: http_status(url) == 200 for name, url in self.urls.items()})

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def always(self, name: str) -> bool:
        return all(sample[name] for sample in self.samples)

    def ever_not(self, name: str) -> bool:
        return any(not sample[name] for sample in self.samples)


def open_stream(served: Served) -> tuple[queue.Queue, object]:
    """A long greedy stream through the ensemble; returns (its events, client) once its first text arrived."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    client.async_stream_infer("ensemble", ensemble_inputs(grpcclient, PROMPT, STREAM_TOKENS, stream=True, end_id=NEVER),
                              enable_empty_final_response=True)
    result, error = events.get(timeout=60)
    assert error is None, error
    return events, client


def stream_end(events: queue.Queue, timeout_s: float = 90) -> tuple[str, str | None]:
    """("final", None) or ("error", message): how the stream ended; an AssertionError if it hangs."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result, error = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"the stream neither ended nor failed within {timeout_s} s of the fault") from None
        if error is not None:
            return "error", error.message()
        if result.get_response().parameters["triton_final_response"].bool_param:
            return "final", None


def victim_pid(served: Served, victim: str) -> int:
    if victim == "tritonserver":
        return served.server.pid
    return python_stubs(served.server.pid)[f"{victim}_0_0"].pid


def wait_recovered(served: Served, recoveries_before: int, began: float) -> float:
    """Seconds from `began` until the supervisor has recovered and tritonserver says ready."""
    health = served.supervisor.health
    while health.recoveries == recoveries_before or health.recovering or not served.server.is_ready():
        assert time.monotonic() - began < RECOVERY_LIMIT_S, f"not recovered after {RECOVERY_LIMIT_S} s"
        time.sleep(0.1)
    return time.monotonic() - began


def wait_slots_free(served: Served, timeout_s: float = 60) -> None:
    """Every engine slot free and nothing waiting (a stream the ensemble dropped may run to its end first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = metric_values(served)
        if values.get("dspark_num_requests_running") == 0 and values.get("dspark_num_requests_waiting") == 0:
            return
        assert time.monotonic() < deadline, {k: v for k, v in values.items() if "num_requests" in k}
        time.sleep(0.2)


CLOSED = "Stream removed"  # gRPC's words for a stream whose connection closed (reset or GOAWAY)
# victim -> what the error that ends the running stream may say (whichever comes first)
FAULTS = {
    # the orchestrator's next pass meets the dead process, or, when the supervisor's restart gets there first, the
    # other one of the pair, already stopping (both seen on a loaded machine)
    "dspark_target": (RECOVERING, STOPPING),
    # the same, or no call reaches the drafter before the restart closes the connection: the draft gate may skip
    # drafting, and an extend-only call's failure is only heard at the next drafter call (seen in CI)
    "dspark_draft": (RECOVERING, STOPPING, CLOSED),
    # the stream's windows wait on the dead postprocessing, or it is past the dead preprocessing: it ends when the
    # restart stops the server, with the orchestrator's words if they get out before the connection closes
    "postprocessing": ("Stub process 'postprocessing_0_0' is not healthy", STOPPING, CLOSED),
    "preprocessing": (STOPPING, CLOSED),
    "dspark_bls": (CLOSED,),  # its stream is never answered again: the restart closes the connection
    "tritonserver": (CLOSED,),
}


def test_the_deployment_probes_answer_on_a_supervised_server(served):
    """deploy/kubernetes/deployment.yaml's probes, on the ports serve gives them."""
    container = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    actual = {8000: served.server.http_url.rsplit(":", 1)[1], 8003: str(served.endpoint.port)}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert http_status(f"http://127.0.0.1:{actual[port]}{get['path']}") == 200, (probe, get)
    annotations = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8003" and annotations["prometheus.io/path"] == "/metrics"
    values = metric_values(served)  # the one scrape port has the supervisor's series and tritonserver's
    assert values['dspark_faults_total{process="dspark_target"}'] == 0 and "dspark_num_requests_waiting" in values


@pytest.mark.parametrize("victim", [pytest.param(v, marks=() if v == "dspark_target" else pytest.mark.slow)
                                    for v in FAULTS])
def test_a_killed_process_is_recovered_and_reported_until_then(served, victim):
    messages = FAULTS[victim]
    health = served.supervisor.health
    faults_before, recoveries_before = health.faults[victim], health.recoveries
    regions_before = {stub.shm_region for stub in python_stubs(served.server.pid).values()}
    log = HealthLog(served)
    events, client = open_stream(served)
    log.start()
    try:
        began = time.monotonic()
        os.kill(victim_pid(served, victim), signal.SIGKILL)
        how, error = stream_end(events)
        seconds = wait_recovered(served, recoveries_before, began)
        time.sleep(0.3)  # a few samples after it, all ready
    finally:
        log.stop()
        client.stop_stream()
        client.close()
    print(f"{victim}: stream ended by {how} ({error}); recovered in {seconds:.1f} s")

    assert how == "error" and any(message in error for message in messages), (how, error)
    assert log.ever_not("ready") and log.ever_not("ensemble"), "never reported not ready while recovering"
    assert all(log.samples[-1].values()), log.samples[-1]
    assert log.always("supervisor_live")  # while tritonserver's own /v2/health/live was gone with it
    assert health.faults[victim] == faults_before + 1 and health.recoveries == recoveries_before + 1
    values = metric_values(served)
    assert values[f'dspark_faults_total{{process="{victim}"}}'] == faults_before + 1
    assert values["dspark_recoveries_total"] == recoveries_before + 1 and values["dspark_recovering"] == 0

    assert generate(served.server) == served.expected  # serves correctly after it
    wait_slots_free(served)
    assert not any((SHM_DIR / region).exists() for region in regions_before)  # the dead server's memory is freed
