"""Soak test: C concurrent clients against a running dspark-trt tritonserver for N minutes, with faults if asked.

Each client sends ensemble requests over its own gRPC stream, one after another (streamed and unary,
greedy and sampled, alternating), and counts every error as a failed request and every request without its
final response after --timeout-s as hung. With --cancel-every N, every Nth request is a stream its client
cancels after the first tokens (a client that goes away); at the end the server's own metrics must show
every slot free again. Every --sample-s seconds the RSS of the tritonserver process and of it plus its
python-backend stubs (where the engines live) is recorded. Writes a JSON report (samples + failures +
summary) and prints the summary.

    python scripts/soak.py --grpc-url 127.0.0.1:8001 --pid $(pgrep -n tritonserver) --minutes 10 --concurrency 16
    python scripts/soak.py --engines ENGINE_DIR --minutes 1 --concurrency 4   # starts its own server
    python scripts/soak.py --serve "--draft default" --kill-every 5 --minutes 30 --concurrency 16

"RSS flat after warm-up" is judged on the samples after --warmup-s: the summary gives the first and last
of them and a least-squares slope in MB per minute.

Faults (issue #20): --serve runs `dspark-trt serve ARGS`, whose supervisor restarts tritonserver when any of
its processes dies, and --kill-every M SIGKILLs one of them every M minutes, the first M/2 minutes in, in
turn: dspark_target, dspark_draft (where speculation is on), preprocessing, postprocessing, dspark_bls,
tritonserver (scripts/recovery_times.py finds and kills them). Per fault the report has the time until
/v2/health/ready answered 200 again, whether a fixed greedy prompt's text after it is its text before the
first fault, the failed requests with their errors, and the RSS levels (before the kill, a minute after
ready, before the next kill). A failure belongs to a fault when its request was in flight between the kill
and ready again; one outside every such window, a hung request, a changed text or a killed server's shared
memory left behind fails the run.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import os
import platform
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from recovery_times import generate, git_revision, one_fault, server_pid, supervised

from dspark_trt.serving.processes import SHM_DIR, python_stubs, rss_mb, tree_rss_mb
from dspark_trt.serving.supervisor import SERVER

VICTIMS = ("dspark_target", "dspark_draft", "preprocessing", "postprocessing", "dspark_bls", SERVER)
PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23?", "Name three prime numbers.",
           "Explain speculative decoding in one sentence.", "Say hello in French."]


def one_request(grpc_url: str, index: int, max_tokens: int, timeout_s: float,
                cancel: bool = False) -> tuple[str, str | None]:
    """Send request number `index` on a fresh stream; its outcome (completed, cancelled, failed, or hung: no
    final response within timeout_s) and error message. cancel: stream it and cancel the stream at its first
    response."""
    import tritonclient.grpc as grpcclient

    def tensor(name, value, dtype, np_dtype):
        t = grpcclient.InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np_dtype))
        return t

    inputs = [tensor("text_input", PROMPTS[index % len(PROMPTS)].encode(), "BYTES", np.object_),
              tensor("max_tokens", max_tokens, "INT32", np.int32),
              tensor("stream", cancel or index % 2 == 0, "BOOL", np.bool_)]
    if index % 4 >= 2:  # sampled
        inputs += [tensor("temperature", 0.8, "FP32", np.float32), tensor("seed", index, "UINT64", np.uint64)]
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer("ensemble", inputs, enable_empty_final_response=True)
        deadline = time.monotonic() + timeout_s
        while True:
            result, error = events.get(timeout=max(0.0, deadline - time.monotonic()))
            if error is not None:
                return "failed", error.message()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return "completed", None
            if cancel:
                client.stop_stream(cancel_requests=True)
                return "cancelled", None
    except queue.Empty:  # cancelled, or the graceful stop_stream below would wait for it forever
        client.stop_stream(cancel_requests=True)
        return "hung", f"no final response within {timeout_s} s"
    except Exception as exc:  # noqa: BLE001 - any client-side failure is a failed request
        with contextlib.suppress(queue.Empty):  # a stream that failed at once: its error went to the callback
            _, error = events.get(timeout=1)
            if error is not None:
                return "failed", error.message()
        return "failed", f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            client.stop_stream()
            client.close()


def server_metrics(metrics_url: str) -> dict[str, float]:
    """The dspark_* series of the server's Prometheus endpoint."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(metrics_url, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("dspark_")}


def drained(metrics_url: str, timeout_s: float = 30) -> dict:
    """After the run: the server's request outcomes, once its engine holds no request (or timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server_metrics(metrics_url)
        if metrics.get("dspark_num_requests_running", 0) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    by_label = {name: {key.split('"')[1]: value for key, value in metrics.items() if key.startswith(f"{name}{{")}
                for name in ("dspark_requests", "dspark_faults_total")}
    return {"running_after_drain": metrics.get("dspark_num_requests_running"),
            "waiting_after_drain": metrics.get("dspark_num_requests_waiting"), **by_label["dspark_requests"],
            **({"faults": by_label["dspark_faults_total"], "recoveries": metrics.get("dspark_recoveries_total")}
               if "dspark_recoveries_total" in metrics else {})}


@dataclass
class FaultPlan:
    """--kill-every: whom to kill when, in the server `serve` runs, and the text the check expects."""

    serve: subprocess.Popen
    ports: dict[str, int]
    victims: list[str]  # in turn
    kill_at_s: list[float]  # after the start
    expected: str  # the check request's text before the first fault


def kill_times(minutes: float, every_min: float) -> list[float]:
    """Every every_min minutes, the first half a period in (a warm RSS level before it, and the last recovery
    inside the run)."""
    times, at = [], every_min * 30
    while at < minutes * 60:
        times.append(at)
        at += every_min * 60
    return times


def classify(failures: list[dict], faults: list[dict]) -> None:
    """Give each failed or hung request the fault whose window it was in flight in (started before the server
    was ready again, ended after the kill), or None: a failure outside every window is a bug."""
    for failure in failures:
        failure["fault"] = next((i for i, fault in enumerate(faults)
                                 if failure["start_s"] <= fault["ready_s"] and failure["end_s"] >= fault["killed_s"]),
                                None)


def error_shapes(failures: list[dict]) -> dict[str, int]:
    """How often each message came, numbers (ports, pids, sizes) masked so that one cause counts once."""
    return dict(collections.Counter(re.sub(r"\d+", "N", f["error"]) for f in failures).most_common())


def rss_levels(samples: list[dict], faults: list[dict], settle_s: float = 60) -> dict:
    """The total RSS before the first fault and, per fault, settle_s after ready again and just before the next
    kill (or the end): the level the server came back to."""
    measured = [s for s in samples if s.get("rss_total_mb")]

    def last_before(t: float) -> float | None:
        return next((s["rss_total_mb"] for s in reversed(measured) if s["t_s"] < t), None)

    bounds = [f["killed_s"] for f in faults[1:]] + [math.inf]
    per_fault = [{"rss_total_mb_before_kill": last_before(fault["killed_s"]),
                  "rss_total_mb_ready_plus_settle": next((s["rss_total_mb"] for s in measured
                                                          if fault["ready_s"] + settle_s <= s["t_s"] < end), None),
                  "rss_total_mb_before_next": last_before(end)} for fault, end in zip(faults, bounds)]
    return {"rss_total_mb_before_first_fault": last_before(faults[0]["killed_s"]) if faults else None,
            "rss_total_mb_at_end": measured[-1]["rss_total_mb"] if measured else None, "faults": per_fault}


def soak(grpc_url: str, current_pid: Callable[[], int | None], minutes: float, concurrency: int, max_tokens: int,
         sample_s: float, timeout_s: float, warmup_s: float, cancel_every: int = 0, retry_after_s: float = 2,
         plan: FaultPlan | None = None) -> dict:
    """Run the clients (and the faults of plan) for `minutes`; current_pid() is the tritonserver to sample RSS
    of (None: none now). A client whose request failed waits retry_after_s, as the server's errors ask, before
    its next."""
    stop_at = time.monotonic() + minutes * 60
    began = time.monotonic()
    lock = threading.Lock()
    counts = {"completed": 0, "cancelled": 0, "failed": 0, "hung": 0}
    failures: list[dict] = []
    faults: list[dict] = []
    fault_errors: list[str] = []
    next_index = iter(range(10**12))

    def client():
        while time.monotonic() < stop_at:
            with lock:
                index = next(next_index)
            cancel = cancel_every > 0 and index % cancel_every == cancel_every - 1
            started = time.monotonic()
            outcome, error = one_request(grpc_url, index, max_tokens, timeout_s, cancel)
            with lock:
                counts[outcome] += 1
                if error is not None:
                    failures.append({"start_s": round(started - began, 2), "end_s": round(time.monotonic() - began, 2),
                                     "request": index, "outcome": outcome, "error": error})
            if error is not None:
                time.sleep(retry_after_s)

    def inject():
        for number, at in enumerate(plan.kill_at_s):
            time.sleep(max(0.0, began + at - time.monotonic()))
            victim = plan.victims[number % len(plan.victims)]
            try:
                fault = one_fault(plan.serve, victim, plan.ports)
                text = generate(plan.ports["http"])
            except Exception as exc:  # noqa: BLE001 - reported, and the run fails
                fault_errors.append(f"fault {number} ({victim}): {type(exc).__name__}: {exc}")
                return
            faults.append({"victim": victim, "pid": fault.pid, "killed_s": round(fault.killed_at - began, 2),
                           "ready_s": round(fault.ready_at - began, 2),
                           "ready_again_s": round(fault.ready_at - fault.killed_at, 1),
                           "supervisor_live_down_samples": fault.live_down_samples,
                           "same_text_after": text == plan.expected, "shm_regions": fault.shm_regions})
            print(json.dumps({k: v for k, v in faults[-1].items() if k != "shm_regions"}), file=sys.stderr, flush=True)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    if plan is not None:
        threads.append(threading.Thread(target=inject, daemon=True))
    for thread in threads:
        thread.start()
    samples = []
    while any(t.is_alive() for t in threads):
        with lock:
            sample = {"t_s": round(time.monotonic() - began, 1), **counts, "load_1min": os.getloadavg()[0]}
        pid = current_pid()
        if pid is not None:
            sample["rss_server_mb"] = round(rss_mb(pid), 1)
            sample["rss_total_mb"] = round(tree_rss_mb(pid), 1)
        samples.append(sample)
        print(json.dumps(sample), file=sys.stderr, flush=True)
        time.sleep(sample_s)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    summary = {"minutes": minutes, "concurrency": concurrency, "max_tokens": max_tokens, "cancel_every": cancel_every,
               **counts, "requests_per_s": round(sum(counts.values()) / elapsed, 2)}
    if plan is None:
        steady = [s for s in samples if s["t_s"] >= warmup_s and "rss_total_mb" in s]
        if len(steady) >= 2:
            t = np.array([s["t_s"] for s in steady]) / 60
            rss = np.array([s["rss_total_mb"] for s in steady])
            summary.update({"rss_total_mb_after_warmup": steady[0]["rss_total_mb"],
                            "rss_total_mb_at_end": steady[-1]["rss_total_mb"],
                            "rss_total_mb_max": float(rss.max()),
                            "rss_slope_mb_per_min": round(float(np.polyfit(t, rss, 1)[0]), 2)})
        summary["errors"] = error_shapes(failures)
        return {"summary": summary, "samples": samples, "failures": failures}
    classify(failures, faults)
    levels = rss_levels(samples, faults)
    for number, (fault, rss) in enumerate(zip(faults, levels.pop("faults"))):
        mine = [f for f in failures if f["fault"] == number]
        fault.update({**rss, "failed": sum(f["outcome"] == "failed" for f in mine),
                      "hung": sum(f["outcome"] == "hung" for f in mine),
                      "last_failure_end_s": max((f["end_s"] for f in mine), default=None),
                      "errors": error_shapes(mine)})
    outside = [f for f in failures if f["fault"] is None]
    summary.update({"kill_at_s": plan.kill_at_s, "faults": len(faults), "fault_errors": fault_errors,
                    "failed_in_a_fault_window": len(failures) - len(outside), "failed_outside": len(outside),
                    "recovered_with_same_text": sum(f["same_text_after"] for f in faults),
                    "leaked_shm_regions": [r for f in faults for r in f.pop("shm_regions") if (SHM_DIR / r).exists()],
                    **levels})
    # the failures of a window are counted by message per fault (hundreds: the clients keep trying while the
    # server restarts); listed one by one only those outside every window and the hung ones
    listed = [f for f in failures if f["fault"] is None or f["outcome"] == "hung"]
    return {"summary": summary, "faults": faults, "samples": samples, "failures": listed}


def current_server(serve: subprocess.Popen) -> int | None:
    """The tritonserver serve runs now (None while the supervisor restarts it)."""
    try:
        return server_pid(serve.pid)
    except RuntimeError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-url", help="host:port of a running server's gRPC endpoint")
    parser.add_argument("--pid", type=int, help="the tritonserver process id (for RSS)")
    parser.add_argument("--engines", help="instead: package this engine directory and serve it for the run")
    parser.add_argument("--schedule", default="fixed", help="with --engines: the served schedule")
    parser.add_argument("--cost-table", help="with --engines and --schedule dspark/async: the SPS(B) table")
    parser.add_argument("--serve", metavar="ARGS",
                        help="instead: run `dspark-trt serve ARGS` (its supervisor restarts the server on faults)")
    parser.add_argument("--kill-every", type=float, default=0, metavar="MINUTES",
                        help="with --serve: SIGKILL one of its processes every MINUTES (0: none)")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=5, help="seconds between RSS samples")
    parser.add_argument("--warmup-s", type=float, default=60, help="samples before this are warm-up")
    parser.add_argument("--timeout-s", type=float, default=120, help="a request slower than this hung")
    parser.add_argument("--retry-after-s", type=float, default=2, help="a client's pause after a failed request")
    parser.add_argument("--cancel-every", type=int, default=0,
                        help="every Nth request is cancelled by its client after the first tokens (0: none)")
    parser.add_argument("--metrics-url", help="a running server's metrics endpoint (for the slot check at the end)")
    parser.add_argument("--out", default="soak.json", help="the JSON report")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.grpc_url, args.engines, args.serve)) != 1:
        parser.error("give one of --grpc-url (a running server), --engines or --serve (start one)")
    if args.minutes <= 0 or args.concurrency < 1 or args.max_tokens < 1 or args.cancel_every < 0:
        parser.error("--minutes, --concurrency and --max-tokens must be positive, --cancel-every >= 0")
    if args.kill_every and not args.serve:
        parser.error("--kill-every needs --serve (a supervised server)")
    report_head = {"command": sys.argv, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                   "git_revision": git_revision(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    plan = None
    with contextlib.ExitStack() as stack:
        grpc_url, server, metrics_url = args.grpc_url, lambda: args.pid, args.metrics_url
        if args.engines:
            from dspark_trt.serving.package import PackageOptions, package_repository
            from dspark_trt.serving.tritonserver import TritonServer

            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dspark-soak-")))
            repo = package_repository(PackageOptions(engines=args.engines, out=str(root / "repo"),
                                                     schedule=args.schedule, cost_table=args.cost_table,
                                                     num_slots=max(8, args.concurrency)))
            triton = stack.enter_context(TritonServer(repo, workdir=root / "work"))
            grpc_url, server, metrics_url = triton.grpc_url, lambda: triton.pid, triton.metrics_url
        if args.serve:
            serve, ports = stack.enter_context(supervised(shlex.split(args.serve)))
            grpc_url, server = f"127.0.0.1:{ports['grpc']}", functools.partial(current_server, serve)
            metrics_url = f"http://127.0.0.1:{ports['supervisor']}/metrics"
            if args.kill_every:
                models = {stub.model for stub in python_stubs(server()).values()}
                plan = FaultPlan(serve, ports, [v for v in VICTIMS if v in models or v == SERVER],
                                 kill_times(args.minutes, args.kill_every), expected=generate(ports["http"]))
        report = {**report_head, **soak(grpc_url, server, args.minutes, args.concurrency, args.max_tokens,
                                        args.sample_s, args.timeout_s, args.warmup_s, args.cancel_every,
                                        args.retry_after_s, plan)}
        if metrics_url:
            report["summary"]["server"] = drained(metrics_url)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    summary = report["summary"]
    print(json.dumps(summary, indent=1))
    print(f"report: {args.out}")
    drain = summary.get("server", {})
    leaked = drain.get("running_after_drain", 0) or drain.get("waiting_after_drain", 0)
    if plan is None:
        return 0 if summary["failed"] + summary["hung"] == 0 and not leaked else 1
    clean = (summary["hung"] == 0 and summary["failed_outside"] == 0 and not summary["fault_errors"]
             and summary["recovered_with_same_text"] == summary["faults"] == len(plan.kill_at_s)
             and not summary["leaked_shm_regions"])
    return 0 if clean and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
