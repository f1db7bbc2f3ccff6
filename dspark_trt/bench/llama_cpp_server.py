"""llama.cpp's OpenAI-compatible server (llama-cpp-python's `[server]` extra) as a peer of `bench load`.

The same GGUF our target comes from, on llama.cpp's CPU kernels in a process of its own, driven by the same
closed loop as our modes: C client streams, each sending its next prompt as soon as its previous answer's
stream ends. Prompts go to /v1/completions as our chat-templated text (the server parses its special tokens
and adds no BOS, so it decodes from the ids our engine does), greedy as the batch-1 peer (temperature 0,
top_k 1, repeat_penalty 1.0), streamed.

What this server is: one `Llama` behind one lock, so it serves one completion at a time and queues the
rest (`interrupt_requests` is turned off: by default each new request cuts off the one streaming). Between
requests it keeps the KV cache of the previous prompt's common prefix (the chat template's system turn),
which our engine does not. llama.cpp's own C++ `llama-server` batches parallel slots; llama-cpp-python
does not ship it.
"""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from dspark_trt.bench.load import RequestRecord, digest, request_budget
from dspark_trt.bench.peers import PeerUnavailable, import_peer
from dspark_trt.errors import DSparkError

PEER_NAME = "llama.cpp server"
SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
START_TIMEOUT_S = 120.0
GREEDY = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
          "presence_penalty": 0.0, "frequency_penalty": 0.0}


def check_server_extra() -> None:
    """PeerUnavailable naming what is missing when llama-cpp-python or its server extra is not installed."""
    import_peer("llama_cpp", "llama-cpp-python")
    for module in SERVER_MODULES:
        import_peer(module, "llama-cpp-python[server]")


class LlamaCppServer:
    """`python -m llama_cpp.server` on one GGUF, CPU only, on a free local port; use as a context manager.
    Its stdout and stderr go to log_path; a failed start raises with the log's tail."""

    def __init__(self, gguf: str | Path, n_ctx: int, threads: int, log_path: Path):
        check_server_extra()
        self.gguf = Path(gguf)
        self.n_ctx = n_ctx
        self.threads = threads
        self.log_path = Path(log_path)
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._process: subprocess.Popen | None = None

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", self.host,
                "--port", str(port), "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
                "--n_threads_batch", str(self.threads), "--n_gpu_layers", "0", "--interrupt_requests", "False"]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        from dspark_trt.serving.tritonserver import free_ports

        self.port = free_ports(self.host, 1)[0]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(self.command(self.port), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise DSparkError(f"the llama.cpp server exited with code {self._process.returncode} while starting:"
                                  f"\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.5)
        self.stop()
        raise DSparkError(f"the llama.cpp server did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            connection.request("GET", "/v1/models")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> dict:
        import llama_cpp

        return {"server": "llama-cpp-python's llama_cpp.server (OpenAI API, /v1/completions, streaming)",
                "llama_cpp_python": llama_cpp.__version__, "gguf": str(self.gguf), "n_ctx": self.n_ctx,
                "n_threads": self.threads, "n_threads_batch": self.threads, "device": "cpu",
                "interrupt_requests": False, "sampling": GREEDY,
                "concurrency": "one completion at a time (one Llama behind one lock); the others queue"}

    def __enter__(self) -> "LlamaCppServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stream_completion(host: str, port: int, text: str, max_tokens: int, timeout_s: float) -> tuple[float, float | None,
                                                                                                     str]:
    """(submit time, time of the first non-empty text, text) of one streamed greedy completion."""
    body = json.dumps({"prompt": text, "max_tokens": max_tokens, "stream": True, **GREEDY})
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    submit, first, pieces, done = time.perf_counter(), None, [], False
    try:
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise DSparkError(f"the llama.cpp server answered HTTP {response.status}: "
                              f"{response.read(500).decode(errors='replace')}")
        for raw in response:  # server-sent events: "data: {json}" lines, then "data: [DONE]"
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            piece = json.loads(data)["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter()
            pieces.append(piece)
    finally:
        connection.close()
    if not done:  # a failure after the stream began (e.g. a prompt over n_ctx) ends it early, with status 200
        raise DSparkError("the llama.cpp server's stream ended before [DONE] (its log says why)")
    return submit, first, "".join(pieces)


def closed_loop_http(host: str, port: int, prompts: list[str], max_tokens: int, concurrency: int,
                     num_requests: int | None, duration_s: float | None, count_tokens: Callable[[str], int],
                     timeout_s: float = 600.0) -> list[RequestRecord]:
    """The closed loop of bench/load.py over the server: `concurrency` client threads, prompts round robin,
    budgets by request_budget, until num_requests were sent or duration_s passed (those in flight run to their
    end). Tokens are count_tokens(text), as in the served sweep; no rounds (ℓ 0, τ none)."""
    lock = threading.Lock()
    records: list[RequestRecord] = []
    errors: list[BaseException] = []
    submitted = 0
    start = time.perf_counter()

    def claim() -> int | None:
        nonlocal submitted
        with lock:
            more = submitted < num_requests if num_requests is not None else time.perf_counter() - start < duration_s
            if errors or not more:
                return None
            submitted += 1
            return submitted - 1

    def client() -> None:
        while (number := claim()) is not None:
            index, budget = number % len(prompts), request_budget(number, concurrency, max_tokens)
            try:
                submit, first, text = stream_completion(host, port, prompts[index], budget, timeout_s)
            except Exception as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                with lock:
                    errors.append(exc)
                return
            finish = time.perf_counter()
            record = RequestRecord(prompt=index, submit=submit, first_token=first or finish, finish=finish,
                                   tokens=count_tokens(text), output_digest=digest(text), max_tokens=budget)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise DSparkError(f"a request to the llama.cpp server failed during the load sweep: {errors[0]}")
    return records


def start_peer(target: str, n_ctx: int, threads: int, log_path: Path) -> tuple[LlamaCppServer | None, str | None]:
    """(a started server, None), or (None, the reason the peer is skipped)."""
    from dspark_trt.models.sources import resolve_model

    source = resolve_model(target)
    if source.kind != "gguf":
        return None, f"the target is not a GGUF file ({source.path}); llama.cpp reads GGUF only"
    try:
        server = LlamaCppServer(source.path, n_ctx, threads, log_path)
    except PeerUnavailable as exc:
        return None, exc.reason
    server.start()
    return server, None
