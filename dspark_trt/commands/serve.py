"""Serve a packaged model repository with a real tritonserver until Ctrl-C or SIGTERM, recovering from
faults: a supervisor (serving/supervisor.py) restarts the server when one of its model processes or the
server itself dies; `--supervisor-port` serves /live and the fault metrics (serving/health_endpoint.py).

Without --repo (what `make serve` runs) the default pair, SmolLM2 and the shipped drafter (`--draft default`),
is built into a cache directory the first time (build-engines), packaged afresh, and served with the dspark
schedule: its draft gate decodes plainly on the steps where drafting cannot pay (on a few CPU cores, most of
them: docs/benchmarks.md), so speculation costs nothing where it does not help. Its cost table is profiled
for these engines on this machine on the first start and cached (dspark_trt/engine/cost_cache.py);
--cost-table overrides it, --no-spec (or --schedule off) serves the target alone.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from dspark_trt.errors import DSparkError
from dspark_trt.serving.default_pair import DEFAULT_DRAFTS, default_options, default_repository
from dspark_trt.serving.health_endpoint import HealthEndpoint
from dspark_trt.serving.package import ENTRY_MODEL
from dspark_trt.serving.supervisor import Supervisor
from dspark_trt.serving.tritonserver import TritonServer
from dspark_trt.spec.scheduler import SCHEDULE_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", help="model repository from `dspark-trt package` "
                        "(default: build and package the default pair into --cache-dir)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--supervisor-port", type=int, default=8003,
                        help="/live (stays up while the server recovers) and /metrics (faults, recoveries, "
                             "and tritonserver's own metrics)")
    parser.add_argument("--address", default="127.0.0.1", help="interface to listen on (default localhost only)")
    parser.add_argument("--target", default="smollm2", help="without --repo: target alias or path")
    parser.add_argument("--draft", help="without --repo: DSpark drafter directory ('default', the shipped one, for "
                                        "the default target; none for another target)")
    parser.add_argument("--schedule", choices=SCHEDULE_MODES,
                        help="without --repo: verification schedule (default dspark, with the draft gate; fixed for "
                             "a drafter without a confidence head)")
    parser.add_argument("--no-spec", action="store_true", help="without --repo: serve the target alone "
                        "(plain autoregressive decoding; same as --schedule off)")
    parser.add_argument("--cost-table", help="without --repo: cost table JSON for dspark/async (default: profiled "
                        "once for these engines on this machine, then cached)")
    parser.add_argument("--cache-dir", help="without --repo: where engines and the repository go "
                        "(default ~/.cache/dspark-trt/serve)")
    parser.add_argument("--log-verbose", action="store_true", help="tritonserver verbose logging")


def run(args: argparse.Namespace) -> int:
    for name in ("http_port", "grpc_port", "metrics_port", "supervisor_port"):
        if not 0 < getattr(args, name) < 65536:
            raise DSparkError(f"--{name.replace('_', '-')} must be in 1..65535, got {getattr(args, name)}")
    if args.repo:
        repo = Path(args.repo)
    else:
        draft = args.draft if args.draft is not None else DEFAULT_DRAFTS.get(args.target)
        repo = default_repository(default_options(args.target, draft, args.cache_dir,
                                                  "off" if args.no_spec else args.schedule, args.cost_table))
    if not (repo / ENTRY_MODEL / "config.pbtxt").is_file():
        raise DSparkError(f"{repo} is not a dspark-trt model repository (no {ENTRY_MODEL}/config.pbtxt); "
                          "make one with `dspark-trt package`")
    _say(f"starting tritonserver on {repo} (loading the models takes a little while)")
    server = TritonServer(repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          log_verbose=args.log_verbose, address=args.address)
    supervisor = Supervisor(server, log=_say)
    endpoint = HealthEndpoint(supervisor, args.address, args.supervisor_port)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        endpoint.start()
        supervisor.start()
        print(usage(server, endpoint.port), flush=True)
        supervisor.run()
    except KeyboardInterrupt:
        _say("stopping tritonserver")
        return 0
    finally:
        server.stop()
        endpoint.stop()
        signal.signal(signal.SIGTERM, previous)


def usage(server: TritonServer, supervisor_port: int) -> str:
    """How to call the running server: a tritonclient snippet and a curl for generate_stream."""
    supervisor = f"http://{server.http_url.rsplit(':', 1)[0]}:{supervisor_port}"
    return f"""
dspark-trt is serving model '{ENTRY_MODEL}' (Ctrl-C to stop)
  HTTP {server.http_url}   gRPC {server.grpc_url}   metrics {server.metrics_url}
  supervisor {supervisor}/live   {supervisor}/metrics (faults and recoveries, then tritonserver's metrics)

curl (server-sent events, one per committed chunk):
  curl -N -X POST http://{server.http_url}/v2/models/{ENTRY_MODEL}/generate_stream \\
       -d '{{"text_input": "Write a haiku about the sea.", "max_tokens": 64, "stream": true}}'
  (drop "stream" and use /generate for one JSON answer)

tritonclient (gRPC streaming):
  import numpy as np, tritonclient.grpc as g
  def tensor(name, value, dtype):
      t = g.InferInput(name, [1, 1], dtype); t.set_data_from_numpy(np.array([[value]], dtype=object
          if dtype == "BYTES" else None)); return t
  client = g.InferenceServerClient("{server.grpc_url}")
  client.start_stream(callback=lambda result, error: print(error or result.as_numpy("text_output")))
  client.async_stream_infer("{ENTRY_MODEL}", [tensor("text_input", "Hello!".encode(), "BYTES"),
      tensor("max_tokens", np.int32(64), "INT32"), tensor("stream", True, "BOOL")])
  client.stop_stream()  # waits for the stream to finish
"""


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)
