"""`serve`'s own HTTP port (default 8003): liveness that outlives tritonserver, and the fault metrics.

- `/live`: 200 while the supervisor runs and has not given up, including while it recovers (a restart
  takes tritonserver's own endpoints away for its duration, so /v2/health/live cannot say this);
- `/metrics`: `dspark_faults_total{process}`, `dspark_recoveries_total`, `dspark_recovering`,
  `dspark_last_recovery_seconds`, followed by tritonserver's own metrics (its nv_* and the engine's
  dspark_* series) when it answers, so one Prometheus scrape of this port sees everything.

Readiness stays tritonserver's (/v2/health/ready, /v2/models/ensemble/ready): while the supervisor restarts
the server nothing answers there, which every probe reads as not ready.
"""
from __future__ import annotations

import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dspark_trt.errors import DSparkError
from dspark_trt.serving.supervisor import Supervisor

TRITON_METRICS_TIMEOUT_S = 2
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def supervisor_metrics(supervisor: Supervisor) -> str:
    """The supervisor's series in Prometheus' text format (every process listed from the start, at 0)."""
    health = supervisor.health
    lines = ["# HELP dspark_faults_total processes of the served system that died, by process",
             "# TYPE dspark_faults_total counter"]
    lines += [f'dspark_faults_total{{process="{p}"}} {health.faults[p]}'
              for p in sorted(set(supervisor.processes) | set(health.faults))]
    lines += ["# HELP dspark_recoveries_total recoveries completed (tritonserver restarted and ready again)",
              "# TYPE dspark_recoveries_total counter", f"dspark_recoveries_total {health.recoveries}"]
    lines += ["# HELP dspark_recovering 1 while a recovery is in progress", "# TYPE dspark_recovering gauge",
              f"dspark_recovering {int(health.recovering)}"]
    if health.last_recovery_s is not None:
        lines += ["# HELP dspark_last_recovery_seconds how long the last recovery took",
                  "# TYPE dspark_last_recovery_seconds gauge",
                  f"dspark_last_recovery_seconds {health.last_recovery_s:.3f}"]
    return "\n".join(lines) + "\n"


def triton_metrics(supervisor: Supervisor) -> str:
    """tritonserver's own metrics text; empty while it cannot be reached (a restart)."""
    if not supervisor.server.is_running():
        return ""
    try:
        with _NO_PROXY.open(supervisor.server.metrics_url, timeout=TRITON_METRICS_TIMEOUT_S) as response:
            return response.read().decode()
    except OSError:
        return ""


class HealthEndpoint:
    """The port, served from a daemon thread; start() before the supervisor starts the server, so that
    /live answers while the models load."""

    def __init__(self, supervisor: Supervisor, address: str = "127.0.0.1", port: int = 0):
        self.supervisor = supervisor
        try:
            self._http = ThreadingHTTPServer((address, port), _handler(supervisor))
        except OSError as exc:
            raise DSparkError(f"cannot listen on {address}:{port} for the supervisor: {exc}") from exc
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="dspark-health", daemon=True)

    @property
    def port(self) -> int:
        return self._http.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def _handler(supervisor: Supervisor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/live":
                live = not supervisor.health.given_up
                self._answer(200 if live else 503, "live\n" if live else "the supervisor gave up\n")
            elif self.path == "/metrics":
                self._answer(200, supervisor_metrics(supervisor) + triton_metrics(supervisor),
                             "text/plain; version=0.0.4")
            else:
                self._answer(404, "not found: /live and /metrics are served here\n")

        def _answer(self, status: int, body: str, content_type: str = "text/plain") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args) -> None:  # noqa: A002 - probes every few seconds: no access log
            pass

    return Handler
