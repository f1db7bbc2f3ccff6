"""The supervisor's decisions without tritonserver: real child processes named like python backend stubs stand
in for a server's models (tests/test_fault_recovery.py does the same against a real server)."""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from dspark_trt.errors import DSparkError
from dspark_trt.serving import processes
from dspark_trt.serving.health_endpoint import HealthEndpoint
from dspark_trt.serving.processes import STUB_NAME, Stub, python_stubs
from dspark_trt.serving.supervisor import Supervisor


class FakeServer:
    """This test process plays tritonserver: its "stubs" are children whose argv is laid out like the stub's."""

    def __init__(self, tmp_path, models=("dspark_target", "dspark_bls"), fail_restarts=0):
        self.tmp_path, self.models, self.fail_restarts = tmp_path, models, fail_restarts
        self.pid = os.getpid()
        self.children: list[subprocess.Popen] = []
        self.restarts = 0
        self.running = True
        self.stubs: dict[str, Stub] = {}
        self.metrics_url = "http://127.0.0.1:9/metrics"  # nothing listens

    def spawn_stubs(self) -> None:
        for model in self.models:
            region = f"region-{model}-{self.restarts}"
            (processes.SHM_DIR / region).write_bytes(b"")
            argv = [str(self.tmp_path / STUB_NAME), "-", region, "0", "0", str(self.pid), "dir", "0", f"{model}_0_0"]
            self.children.append(subprocess.Popen(argv, executable=sys.executable, stdin=subprocess.PIPE))
        # Popen returns once the child's exec has closed its close-on-exec pipe, which the kernel does before it
        # lays out the new command line; like tritonserver, which reads stubs only once it is ready, wait for them.
        deadline = time.monotonic() + 10
        while len(python_stubs(self.pid)) < len(self.models) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stubs = python_stubs(self.pid)

    def start(self, timeout_s: float) -> None:
        self.spawn_stubs()

    def restart(self, grace_s: float, timeout_s: float) -> None:
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise DSparkError("tritonserver exited with code 1 before it was ready")
        self.kill_all()
        self.restarts += 1
        self.running = True
        self.spawn_stubs()

    def is_running(self) -> bool:
        return self.running

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()
            child.wait()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(processes, "SHM_DIR", tmp_path)
    fake = FakeServer(tmp_path)
    yield fake
    fake.kill_all()


def kill(server: FakeServer, model: str) -> None:
    child = next(c for c in server.children if c.pid == python_stubs(server.pid)[f"{model}_0_0"].pid)
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_stubs_are_read_from_proc_by_instance_name(server):
    server.spawn_stubs()
    stubs = python_stubs(server.pid)
    assert sorted(stubs) == ["dspark_bls_0_0", "dspark_target_0_0"]
    assert stubs["dspark_target_0_0"].model == "dspark_target"
    assert stubs["dspark_bls_0_0"].shm_region == "region-dspark_bls-0"
    assert python_stubs(server.children[0].pid) == {}  # another parent's


def test_a_dead_model_process_or_server_restarts_the_server_and_is_counted(server, tmp_path):
    supervisor = Supervisor(server)
    supervisor.start()
    supervisor.check()
    assert server.restarts == 0 and supervisor.health.recoveries == 0  # all alive: nothing to do
    kill(server, "dspark_target")
    supervisor.check()
    assert server.restarts == 1 and supervisor.health.faults == {"dspark_target": 1}
    assert supervisor.health.recoveries == 1 and not supervisor.health.recovering
    supervisor.check()
    assert server.restarts == 1  # the new server's processes are the ones watched now
    server.running = False
    supervisor.check()
    assert server.restarts == 2 and supervisor.health.faults == {"dspark_target": 1, "tritonserver": 1}
    assert supervisor.processes == ["tritonserver", "dspark_bls", "dspark_target"]


def test_the_supervisor_gives_up_after_failed_restarts_and_liveness_says_so(server):
    server.fail_restarts = 3
    supervisor = Supervisor(server, max_failed_restarts=3)
    endpoint = HealthEndpoint(supervisor)
    endpoint.start()
    try:
        supervisor.start()
        url = f"http://127.0.0.1:{endpoint.port}"
        assert get(f"{url}/live") == (200, "live\n")
        status, text = get(f"{url}/metrics")
        assert status == 200 and 'dspark_faults_total{process="dspark_target"} 0' in text
        assert "dspark_recoveries_total 0" in text and "dspark_recovering 0" in text
        kill(server, "dspark_bls")
        with pytest.raises(DSparkError, match="could not be restarted"):
            supervisor.check()
        assert get(f"{url}/live")[0] == 503 and get(f"{url}/other")[0] == 404
        assert 'dspark_faults_total{process="dspark_bls"} 1' in get(f"{url}/metrics")[1]
    finally:
        endpoint.stop()


def get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_run_returns_when_stopped(server):
    supervisor = Supervisor(server)
    supervisor.start()
    stop = threading.Event()
    thread = threading.Thread(target=supervisor.run, args=(stop,))
    thread.start()
    time.sleep(0.6)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and server.restarts == 0

