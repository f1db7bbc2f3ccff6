"""Launch the real `tritonserver` from the nvidia-pytriton wheel, with python models running in our venv.

The wheel carries tritonserver 2.51.0, its python backend and one `triton_python_backend_stub` per
Python minor version. We run its binary directly (not PyTriton's `Triton` class) so we serve an
ordinary model repository: `config.pbtxt` + `model.py`, the same files a GPU container serves.

Making the stub run our interpreter's environment:
- the stub for `sys.version_info[:2]` is copied, with `libtriton_python.so` and
  `triton_python_backend_utils.py`, into a writable backend directory (per-user cache, or `workdir`);
  site-packages may be read-only and the python backend looks for the stub next to its library;
- the stub embeds `libpython3.X.so.1.0`: the directory holding our interpreter's own shared libpython
  goes first on LD_LIBRARY_PATH so the stub runs the same patch release (else it would pick the
  system one), followed by the wheel's `nvidia_pytriton.libs` (the copied stub's RPATH no longer
  reaches them);
- the embedded interpreter finds its prefix by searching PATH for `python3`, so our interpreter's bin
  directory goes first on PATH: it finds the venv's `pyvenv.cfg` and gets the venv's site-packages,
  `.pth` files (our editable install) included. Without this the stub cannot even import numpy.
  No EXECUTION_ENV_PATH or PYTHONHOME is needed.

Security defaults (flags checked against `tritonserver --help` of 2.51.0):
- `--model-control-mode=none`: no model load/unload at run time;
- HTTP, gRPC and metrics listen on 127.0.0.1 unless `address` says otherwise;
- the mutating or introspective admin APIs `model-repository`, `shared-memory`, `trace` and `logging`
  need a header holding a token generated per server (`--http-restricted-api` /
  `--grpc-restricted-protocol`); `admin_headers()` returns it for our own tooling. Health, metadata,
  model-config, inference and (read-only) statistics stay open: clients and benchmarks need them;
- SageMaker and Vertex AI endpoints are switched off explicitly (Vertex turns on by itself when
  AIP_MODE=PREDICTION is set).

The server runs in its own session (process group) so that stop() can remove stub processes that
outlive it. Warnings about NVML/DCGM/pinned memory on CPU-only machines are harmless.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from dspark_trt.cache import cache_dir
from dspark_trt.errors import DSparkError
from dspark_trt.serving.processes import STUB_NAME, Stub, python_stubs, remove_shm_regions

ACCESS_HEADER = "x-dspark-admin-key"
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_LOG_TAIL_CHARS = 6000
# On SIGTERM tritonserver waits this long for open connections (an idle keep-alive client counts), then
# as long again for in-flight requests while models unload; Triton's default of 30 s each outlasts stop().
EXIT_TIMEOUT_S = 5
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never ask a proxy about localhost


def http_status(url: str, timeout: float = 2) -> int | None:
    """The HTTP status a GET of url answers, or None while nothing answers (refused, reset, timed out)."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, http.client.HTTPException):
        return None


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel keeps the server: the binary, its (read-only) backends, bundled libs, our stub."""

    binary: Path
    backends_dir: Path
    libs_dir: Path
    stub: Path


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver inside the installed nvidia-pytriton wheel (without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise DSparkError("tritonserver not found: the nvidia-pytriton package is not installed "
                          "(pip install 'nvidia-pytriton>=0.7')")
    package = Path(spec.origin).parent
    server = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=server / "bin" / "tritonserver",
        backends_dir=server / "backends",
        libs_dir=package.parent / "nvidia_pytriton.libs",
        stub=server / "python_backend_stubs" / version / STUB_NAME,
    )
    if not install.stub.is_file():
        stubs = sorted(p.name for p in (server / "python_backend_stubs").glob("*"))
        raise DSparkError(f"nvidia-pytriton at {package} has no python backend stub for Python {version} "
                          f"(stubs for: {', '.join(stubs) or 'none'})")
    python_backend = install.backends_dir / "python"
    for path in (install.binary, install.libs_dir, *(python_backend / f for f in _PYTHON_BACKEND_FILES)):
        if not path.exists():
            raise DSparkError(f"broken nvidia-pytriton install at {package}: {path} is missing")
    return install


def prepare_backend_directory(install: TritonInstall, root: Path | None = None) -> Path:
    """A writable backend directory whose python backend has the stub for our Python; returns its path.

    Default root: a per-user cache keyed by the wheel's files, built once and reused. The copy is
    made in a temporary directory and renamed into place, so concurrent servers never see half of it.
    """
    sources = [install.stub, *(install.backends_dir / "python" / f for f in _PYTHON_BACKEND_FILES)]
    if root is None:
        stat_key = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)
        root = cache_dir() / f"tritonserver-py{sys.version_info.major}.{sys.version_info.minor}-" \
                       f"{hashlib.sha256(stat_key.encode()).hexdigest()[:12]}"
    backends = Path(root) / "backends"
    if (backends / "python" / STUB_NAME).is_file():
        return backends
    try:
        backends.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=backends.parent))
        (staging / "python").mkdir()
        for source in sources:
            shutil.copy2(source, staging / "python" / source.name)
        try:
            staging.rename(backends)
        except OSError:  # another process finished first (its copy is identical), else re-raise
            shutil.rmtree(staging, ignore_errors=True)
            if not (backends / "python" / STUB_NAME).is_file():
                raise
    except OSError as exc:  # read-only file systems raise EROFS, not PermissionError
        raise DSparkError(f"cannot create the tritonserver backend directory under {backends.parent}: {exc}; "
                          "pass a writable workdir") from exc
    return backends


def server_environment(install: TritonInstall, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment under which tritonserver's python stubs run this interpreter's environment."""
    env = dict(os.environ)
    lib_dirs = []
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        lib_dirs.append(libdir)
    lib_dirs.append(str(install.libs_dir))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def free_ports(address: str, count: int) -> list[int]:
    """Ports free right now on address (all held open together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((address, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]


class TritonServer:
    """A tritonserver process serving `model_repository`; use as a context manager.

    Ports left at 0 are picked free at start(). `http_url` and `grpc_url` are `host:port`, the form
    tritonclient takes; `metrics_url` is the full Prometheus scrape URL. The server log (stdout and
    stderr of the server and of its python stubs) is `workdir/tritonserver.log`; without a workdir it
    goes to a temporary directory that stop() deletes (start() errors carry the log's tail).
    """

    def __init__(self, model_repository: Path, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 log_verbose: bool = False, extra_args: tuple[str, ...] | list[str] = (),
                 env: dict[str, str] | None = None, workdir: Path | None = None, address: str = "127.0.0.1"):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise DSparkError(f"model repository {model_repository} is not a directory")
        self.install = find_tritonserver()
        self.requested_ports = (http_port, grpc_port, metrics_port)
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.workdir = Path(workdir).resolve() if workdir is not None else None
        self.address = address
        self.access_token = secrets.token_urlsafe(32)
        self.log_path: Path | None = None
        self.stubs: dict[str, Stub] = {}  # its python model processes, by instance, as they were when it was ready
        self._ports: tuple[int, int, int] | None = None
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self._owned_workdir: Path | None = None

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "::", "") else self.address

    def _port(self, index: int) -> int:
        if self._ports is None:
            raise DSparkError("the tritonserver has not been started")
        return self._ports[index]

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self._port(0)}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self._port(1)}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self._port(2)}/metrics"

    def admin_headers(self, grpc: bool = False) -> dict[str, str]:
        """Headers that unlock the restricted APIs (gRPC metadata keys get Triton's protocol prefix)."""
        key = f"triton-grpc-protocol-{ACCESS_HEADER}" if grpc else ACCESS_HEADER
        return {key: self.access_token}

    # -- lifecycle ---------------------------------------------------------------------------------
    def command(self, backends: Path) -> list[str]:
        """The tritonserver command line (ports must be resolved)."""
        restriction = f"{','.join(RESTRICTED_APIS)}:{ACCESS_HEADER}={self.access_token}"
        http_port, grpc_port, metrics_port = self._ports
        return [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=none",
            f"--http-address={self.address}", f"--http-port={http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={grpc_port}",
            f"--metrics-address={self.address}", f"--metrics-port={metrics_port}",
            f"--http-restricted-api={restriction}",
            f"--grpc-restricted-protocol={restriction}",
            "--allow-sagemaker=false", "--allow-vertex-ai=false",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={int(self.log_verbose)}",
            *self.extra_args,
        ]

    def start(self, timeout_s: float = 120) -> None:
        """Launch the server and wait until /v2/health/ready (all models loaded). A server started again
        keeps its ports, workdir and log (appended to)."""
        if self.is_running():
            raise DSparkError("this tritonserver is already running")
        if self.workdir is None:
            self._owned_workdir = self._owned_workdir or Path(tempfile.mkdtemp(prefix="dspark-tritonserver-"))
            workdir = self._owned_workdir
        else:
            workdir = self.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backend_directory(self.install, self.workdir)
        if self._ports is None:
            free = iter(free_ports(self.address, sum(p == 0 for p in self.requested_ports)))
            self._ports = tuple(p or next(free) for p in self.requested_ports)
        self.log_path = workdir / "tritonserver.log"
        self._log_file = self._log_file or open(self.log_path, "ab")
        try:
            self._process = subprocess.Popen(
                self.command(backends), stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                env=server_environment(self.install, self.extra_env), cwd=workdir, start_new_session=True)
        except OSError as exc:
            self._fail(f"cannot run {self.install.binary}: {exc}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                message = f"tritonserver exited with code {self._process.returncode} before it was ready"
                self._fail(message)
            if self.is_ready():
                self.stubs = python_stubs(self._process.pid)
                return
            time.sleep(0.2)
        self._fail(f"tritonserver was not ready after {timeout_s:.0f} s")

    def restart(self, grace_s: float, timeout_s: float = 600) -> None:
        """End the server (SIGTERM, SIGKILL after grace_s) and every process it left, then start it again on
        the same ports."""
        self._end(grace_s)
        self.start(timeout_s)

    def is_ready(self) -> bool:
        """/v2/health/ready answers 200 (False while it cannot be reached)."""
        return http_status(f"http://{self.http_url}/v2/health/ready", timeout=1) == 200

    def _fail(self, message: str) -> NoReturn:
        """Stop, and raise a DSparkError with message and the log's tail (read before stop deletes it)."""
        tail = self.log_tail()
        self.stop()
        raise DSparkError(f"{message}\n{tail}")

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM the server (it unloads models, stubs finalize), SIGKILL it after timeout_s, then kill
        whatever is left of its process group, stubs included."""
        self._end(timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owned_workdir is not None:
            shutil.rmtree(self._owned_workdir, ignore_errors=True)
            self._owned_workdir = None

    def _end(self, grace_s: float) -> None:
        """End the server process (SIGTERM, SIGKILL after grace_s) and everything left in its group, and remove
        its stubs' shared memory (a SIGKILLed stub never unlinks its own: a few MB leaked per kill)."""
        process, self._process = self._process, None
        stubs, self.stubs = list(self.stubs.values()), {}
        if process is None:
            return
        if process.poll() is None and grace_s > 0:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace_s)
        if process.poll() is None:
            process.kill()
            process.wait()  # reaped first: an unreaped leader would keep its group alive for _kill_group
        self._kill_group(process.pid)
        remove_shm_regions(stubs)

    @staticmethod
    def _kill_group(pgid: int, timeout_s: float = 5) -> None:
        """SIGKILL every process left in the server's process group and wait until they are gone."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the server log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        text = self.log_path.read_bytes()[-chars:].decode("utf-8", errors="replace")
        return f"--- tritonserver log, last {len(text)} characters ---\n{text}"

    @property
    def pid(self) -> int | None:
        """The tritonserver process id while it runs (its python model stubs are its children)."""
        return self._process.pid if self.is_running() else None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
