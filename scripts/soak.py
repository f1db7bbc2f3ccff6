"""Soak test: C concurrent clients against a running dspark-trt tritonserver for N minutes.

Each client sends ensemble requests over its own gRPC stream, one after another (streamed and unary,
greedy and sampled, alternating), and counts every error or timeout as a failed request. With
--cancel-every N, every Nth request is a stream its client cancels after the first tokens (a client that
goes away); at the end the server's own metrics must show every slot free again. Every
--sample-s seconds the RSS of the tritonserver process and of it plus its python-backend stubs (where
the engines live) is recorded. Writes a JSON report (samples + failures + summary) and prints the summary.

    python scripts/soak.py --grpc-url 127.0.0.1:8001 --pid $(pgrep -n tritonserver) --minutes 10 --concurrency 16
    python scripts/soak.py --engines ENGINE_DIR --minutes 1 --concurrency 4   # starts its own server

"RSS flat after warm-up" is judged on the samples after --warmup-s: the summary gives the first and last
of them and a least-squares slope in MB per minute.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23?", "Name three prime numbers.",
           "Explain speculative decoding in one sentence.", "Say hello in French."]


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (the python backend stubs are the server's children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def one_request(grpc_url: str, index: int, max_tokens: int, timeout_s: float, cancel: bool = False) -> str | None:
    """Send request number `index` on a fresh stream; None on success, else the error. cancel: stream it
    and cancel the stream at its first response."""
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
                return error.message()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None
            if cancel:
                client.stop_stream(cancel_requests=True)
                return None
    except queue.Empty:
        return f"no final response within {timeout_s} s"
    except Exception as exc:  # noqa: BLE001 - any client-side failure is a failed request
        return f"{type(exc).__name__}: {exc}"
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
    return {"running_after_drain": metrics.get("dspark_num_requests_running"),
            "waiting_after_drain": metrics.get("dspark_num_requests_waiting"),
            **{key.split('"')[1]: value for key, value in metrics.items() if key.startswith("dspark_requests{")}}


def soak(grpc_url: str, pid: int | None, minutes: float, concurrency: int, max_tokens: int, sample_s: float,
         timeout_s: float, warmup_s: float, cancel_every: int = 0) -> dict:
    stop_at = time.monotonic() + minutes * 60
    began = time.monotonic()
    lock = threading.Lock()
    counts = {"completed": 0, "cancelled": 0, "failed": 0}
    failures: list[dict] = []
    next_index = iter(range(10**12))

    def client():
        while time.monotonic() < stop_at:
            with lock:
                index = next(next_index)
            cancel = cancel_every > 0 and index % cancel_every == cancel_every - 1
            error = one_request(grpc_url, index, max_tokens, timeout_s, cancel)
            with lock:
                counts["failed" if error is not None else "cancelled" if cancel else "completed"] += 1
                if error is not None and len(failures) < 100:
                    failures.append({"t_s": round(time.monotonic() - began, 1), "request": index, "error": error})

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    samples = []
    while any(t.is_alive() for t in threads):
        with lock:
            sample = {"t_s": round(time.monotonic() - began, 1), **counts}
        if pid is not None:
            sample["rss_server_mb"] = round(rss_mb(pid), 1)
            sample["rss_total_mb"] = round(sum(rss_mb(p) for p in descendants(pid)), 1)
        samples.append(sample)
        print(json.dumps(sample), file=sys.stderr, flush=True)
        time.sleep(sample_s)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    summary = {"minutes": minutes, "concurrency": concurrency, "max_tokens": max_tokens, "cancel_every": cancel_every,
               **counts, "requests_per_s": round(sum(counts.values()) / elapsed, 2)}
    steady = [s for s in samples if s["t_s"] >= warmup_s and "rss_total_mb" in s]
    if len(steady) >= 2:
        t = np.array([s["t_s"] for s in steady]) / 60
        rss = np.array([s["rss_total_mb"] for s in steady])
        summary.update({"rss_total_mb_after_warmup": steady[0]["rss_total_mb"],
                        "rss_total_mb_at_end": steady[-1]["rss_total_mb"],
                        "rss_total_mb_max": float(rss.max()),
                        "rss_slope_mb_per_min": round(float(np.polyfit(t, rss, 1)[0]), 2)})
    return {"summary": summary, "samples": samples, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-url", help="host:port of a running server's gRPC endpoint")
    parser.add_argument("--pid", type=int, help="the tritonserver process id (for RSS)")
    parser.add_argument("--engines", help="instead: package this engine directory and serve it for the run")
    parser.add_argument("--schedule", default="fixed", help="with --engines: the served schedule")
    parser.add_argument("--cost-table", help="with --engines and --schedule dspark/async: the SPS(B) table")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=5, help="seconds between RSS samples")
    parser.add_argument("--warmup-s", type=float, default=60, help="samples before this are warm-up")
    parser.add_argument("--timeout-s", type=float, default=120, help="a request slower than this failed")
    parser.add_argument("--cancel-every", type=int, default=0,
                        help="every Nth request is cancelled by its client after the first tokens (0: none)")
    parser.add_argument("--metrics-url", help="a running server's metrics endpoint (for the slot check at the end)")
    parser.add_argument("--out", default="soak.json", help="the JSON report")
    args = parser.parse_args(argv)
    if (args.grpc_url is None) == (args.engines is None):
        parser.error("give --grpc-url (a running server) or --engines (start one), not both")
    if args.minutes <= 0 or args.concurrency < 1 or args.max_tokens < 1 or args.cancel_every < 0:
        parser.error("--minutes, --concurrency and --max-tokens must be positive, --cancel-every >= 0")
    with contextlib.ExitStack() as stack:
        grpc_url, pid, metrics_url = args.grpc_url, args.pid, args.metrics_url
        if args.engines:
            from dspark_trt.serving.package import PackageOptions, package_repository
            from dspark_trt.serving.tritonserver import TritonServer

            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dspark-soak-")))
            repo = package_repository(PackageOptions(engines=args.engines, out=str(root / "repo"),
                                                     schedule=args.schedule, cost_table=args.cost_table,
                                                     num_slots=max(8, args.concurrency)))
            server = stack.enter_context(TritonServer(repo, workdir=root / "work"))
            grpc_url, pid, metrics_url = server.grpc_url, server.pid, server.metrics_url
        report = soak(grpc_url, pid, args.minutes, args.concurrency, args.max_tokens, args.sample_s,
                      args.timeout_s, args.warmup_s, args.cancel_every)
        if metrics_url:
            report["summary"]["server"] = drained(metrics_url)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    for failure in report["failures"][:5]:
        print(f"failed at {failure['t_s']} s: {failure['error']}")
    print(f"report: {args.out}")
    leaked = report["summary"].get("server", {}).get("running_after_drain", 0)
    return 0 if report["summary"]["failed"] == 0 and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
