"""Recovery times of `dspark-trt serve`: SIGKILL each named process once and time it until ready again.

Runs the real command (`python -m dspark_trt serve --repo REPO` on free ports, or packages --engines first),
asks one greedy request before the faults, then per victim: SIGKILL it (a model's python stub, or
tritonserver itself), poll /v2/health/ready and the supervisor's /live every 0.1 s until ready again, and
ask the same request. Writes a JSON report and prints one line per fault.

    python scripts/recovery_times.py --engines ~/.cache/dspark-trt/serve/engines-... --schedule off \\
        --out docs/bench/recovery_default.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dspark_trt.serving.processes import python_stubs, stat_fields
from dspark_trt.serving.tritonserver import free_ports, http_status

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
BODY = {"text_input": "What is the capital of France?", "max_tokens": 24}


def generate(http_port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/ensemble/generate",
                                     json.dumps(BODY).encode())
    with _NO_PROXY.open(request, timeout=120) as response:
        return json.loads(response.read())["text_output"]


def server_pid(serve_pid: int) -> int:
    """The tritonserver that serve runs (its child)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            binary = (proc / "cmdline").read_bytes().split(b"\0")[0]
            parent = int(stat_fields(proc / "stat")[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == serve_pid and binary.endswith(b"/tritonserver"):
            return int(proc.name)
    raise RuntimeError("serve runs no tritonserver")


@dataclass
class Fault:
    """One kill and the recovery after it (times from time.monotonic())."""

    victim: str
    pid: int
    killed_at: float
    ready_at: float
    not_ready_samples: int
    live_down_samples: int  # of the supervisor's /live, polled alongside
    shm_regions: list[str]  # of the killed server's stubs: the restart must remove them


def one_fault(serve: subprocess.Popen, victim: str, ports: dict[str, int]) -> Fault:
    """SIGKILL victim (a model's python stub, or tritonserver itself), then poll readiness and the supervisor's
    /live every 0.1 s until the server has been not ready and is ready again (the dead server still says ready
    until the supervisor's next look)."""
    server = server_pid(serve.pid)
    stubs = python_stubs(server)
    pid = server if victim == "tritonserver" else stubs[f"{victim}_0_0"].pid
    killed_at, not_ready, live_down = time.monotonic(), 0, 0
    os.kill(pid, signal.SIGKILL)
    while True:
        ready = http_status(f"http://127.0.0.1:{ports['http']}/v2/health/ready") == 200
        live_down += http_status(f"http://127.0.0.1:{ports['supervisor']}/live") != 200
        if ready and not_ready:
            return Fault(victim, pid, killed_at, time.monotonic(), not_ready, live_down,
                         [stub.shm_region for stub in stubs.values()])
        if serve.poll() is not None:
            raise RuntimeError(f"serve exited (code {serve.returncode}) after {victim} was killed")
        not_ready += not ready
        time.sleep(0.1)


@contextlib.contextmanager
def supervised(serve_args: list[str]) -> Iterator[tuple[subprocess.Popen, dict[str, int]]]:
    """`dspark-trt serve` with serve_args on free ports (http, grpc, metrics, supervisor), from the moment it
    is serving; SIGTERMed on exit."""
    ports = dict(zip(("http", "grpc", "metrics", "supervisor"), free_ports("127.0.0.1", 4)))
    serve = subprocess.Popen([sys.executable, "-m", "dspark_trt", "serve", *serve_args,
                              *(a for name, port in ports.items() for a in (f"--{name}-port", str(port)))],
                             stdout=subprocess.PIPE, text=True)
    try:
        while "is serving" not in serve.stdout.readline():
            if serve.poll() is not None:
                raise RuntimeError("serve exited before it was serving")
        yield serve, ports
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)


def git_revision() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", help="a packaged model repository")
    parser.add_argument("--engines", help="instead: package this engine directory first")
    parser.add_argument("--schedule", default="off", help="with --engines: the served schedule")
    parser.add_argument("--victims", nargs="+", default=["dspark_target", "dspark_bls", "tritonserver"])
    parser.add_argument("--out", default="recovery.json")
    args = parser.parse_args(argv)
    repo = args.repo
    if repo is None:
        from dspark_trt.serving.package import PackageOptions, package_repository

        repo = str(package_repository(PackageOptions(engines=args.engines, out=tempfile.mkdtemp() + "/repo",
                                                     schedule=args.schedule)))
    began = time.monotonic()
    with supervised(["--repo", repo]) as (serve, ports):
        report = {"command": sys.argv, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "git_revision": git_revision(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "first_start_s": round(time.monotonic() - began, 1), "faults": []}
        expected = generate(ports["http"])
        for victim in args.victims:
            fault = one_fault(serve, victim, ports)
            report["faults"].append({"victim": victim, "ready_again_s": round(fault.ready_at - fault.killed_at, 1),
                                     "not_ready_samples": fault.not_ready_samples,
                                     "supervisor_live_down_samples": fault.live_down_samples,
                                     "same_text_after": generate(ports["http"]) == expected})
            print(json.dumps(report["faults"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
