"""The serving loop behind the `dspark_bls` model: one engine, one engine thread, every in-flight request.

Triton's `execute` only parses a request into a `Job` and submits it; the engine thread admits jobs
between engine steps (continuous batching) and hands each request's committed tokens to a sender thread
that streams them through its response sender; a poller thread asks the senders, once per engine step,
whether their clients cancelled. Both are round trips to tritonserver that the engine thread does not
wait for. Nothing here imports Triton: the model passes `respond` (build and send a response) and
`is_cancelled` callables, so the loop is tested with plain fakes.
"""
from __future__ import annotations

import functools
import json
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dspark_trt.engine.engine import Engine, EngineOverloadedError
from dspark_trt.engine.factory import EngineOptions
from dspark_trt.engine.request import Request, SamplingParams, Status
from dspark_trt.errors import DSparkError
from dspark_trt.serving.bls_services import STOPPING
from dspark_trt.serving.cancellation import new_request_key
from dspark_trt.serving.request_parsing import Limits
from dspark_trt.serving.text import stream_window

IDLE_WAIT_S = 0.05  # how often an idle loop wakes to poll for cancellations and shutdown


@dataclass
class Job:
    """One client request: what to generate, how to answer, and how far the answer has got."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    perf_metrics: bool
    sender: object  # opaque to the loop; `respond` and `is_cancelled` know what it is
    request: Request | None = None
    key: int = field(default_factory=new_request_key)  # tags its responses; a stop request names it
    shown: int = 0  # output ids already sent
    closed: bool = False  # the final response went out


# respond(job, outputs or None, error message or None, final)
Respond = Callable[[Job, dict[str, np.ndarray] | None, str | None, bool], None]


class Orchestrator:
    """Drives `engine` on a background thread; `submit` is safe from any thread."""

    def __init__(self, engine: Engine, respond: Respond, is_cancelled: Callable[[Job], bool],
                 observe: Callable[[str, Job], None] | None = None):
        self.engine = engine
        self._respond = respond
        self._is_cancelled = is_cancelled
        self._observe = observe or (lambda event, job: None)  # "finished" hooks for metrics
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._stop_keys: queue.Queue[int] = queue.Queue()
        self._live: list[Job] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dspark-engine", daemon=True)
        # (job, outputs, error, final) for the sender thread; None ends it
        self._outbox: queue.Queue[tuple | None] = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="dspark-responses", daemon=True)
        self._sweep = threading.Event()  # set once per engine step: the poller asks every live job's sender
        self._poller = threading.Thread(target=self._poll_loop, name="dspark-cancel-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._sender.start()
        self._poller.start()

    def stop(self, timeout_s: float = 10) -> None:
        """Stop the loop; requests still open get an error so their clients are not left waiting."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._poller.is_alive():
            self._poller.join(timeout_s)
        for job in self._live + _drain(self._inbox):
            self._close(job, None, f"{STOPPING}, retry in a few seconds")
        self._outbox.put(None)
        if self._sender.is_alive():
            self._sender.join(timeout_s)
        else:  # never started: send what is queued here
            self._send_loop()

    def submit(self, job: Job) -> None:
        """Queue job for the engine thread; EngineOverloadedError at once when max_queue_size requests
        already wait, so load beyond capacity is refused, not absorbed."""
        depth, limit = self.queue_depth, self.engine.max_queue_size
        if depth >= limit:
            raise EngineOverloadedError(f"overloaded: {depth} requests already waiting (max_queue_size {limit}); "
                                        "retry later")
        self._inbox.put(job)

    def stop_request(self, key: int) -> None:
        """Cancel the job whose responses carry `key` (safe from any thread); a key no live job has is
        ignored: that job has already ended."""
        self._stop_keys.put(key)

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting) + self._inbox.qsize()

    @property
    def active(self) -> int:
        return sum(not r.done for r in self.engine.running)

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._admit(block=not self.engine.has_work)
            self._apply_stop_requests()
            self._sweep.set()
            if not self.engine.has_work:
                continue
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a broken step fails its requests, not the server
                self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            self._live = [job for job in self._live if not job.closed]

    def _admit(self, block: bool) -> None:
        jobs = []
        if block:
            try:
                jobs.append(self._inbox.get(timeout=IDLE_WAIT_S))
            except queue.Empty:
                return
        jobs += _drain(self._inbox)
        for job in jobs:
            try:
                job.request = self.engine.add_request(job.prompt_ids, job.params,
                                                      on_tokens=functools.partial(self._on_tokens, job))
            except DSparkError as exc:  # bad parameters, prompt too long, queue full
                self._close(job, None, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one unreadable request must not stop the loop
                self._close(job, None, f"request refused: {type(exc).__name__}: {exc}")
                continue
            self._live.append(job)

    def _apply_stop_requests(self) -> None:
        stopped = set(_drain(self._stop_keys))
        for job in self._live:
            if job.key in stopped and not job.closed:
                self.engine.cancel(job.request)

    def _poll_loop(self) -> None:
        """Once per engine step, ask each live job's sender whether its client cancelled. Each ask is a round
        trip to tritonserver (90-120 µs, scripts/python_backend_costs.py); off the engine thread, a
        cancellation heard during a step still takes effect at the start of the next (engine.cancel only
        sets the flag the engine reads there)."""
        while not self._stop.is_set():
            if not self._sweep.wait(IDLE_WAIT_S):
                continue
            self._sweep.clear()
            for job in list(self._live):  # a copy: the engine thread appends to the list and replaces it
                if not job.closed and not job.request.cancel_requested and self._asks_to_cancel(job):
                    self.engine.cancel(job.request)

    def _asks_to_cancel(self, job: Job) -> bool:
        try:
            return self._is_cancelled(job)
        except Exception:  # noqa: BLE001 - a sender that cannot be asked has lost its client
            return True

    def _on_tokens(self, job: Job, request: Request, new_ids: list[int], finished: bool) -> None:
        if request.status is Status.CANCELLED:
            self._close(job, None, None)
        elif request.status is Status.FAILED:
            self._close(job, None, request.error or "generation failed")
        elif job.stream and new_ids or finished:
            outputs = self._outputs(job, finished)
            if finished:
                self._close(job, outputs, None)
            else:
                self._send(job, outputs, None, False)

    def _outputs(self, job: Job, final: bool) -> dict[str, np.ndarray]:
        ids = job.request.output_ids
        window, prefix = stream_window(ids, job.shown) if job.stream else (ids, 0)
        new = job.shown if job.stream else 0  # the first id this response carries
        job.shown = len(ids)
        outputs = {
            "output_ids": np.asarray(window, np.int32).reshape(1, -1),
            "prefix_length": np.array([[prefix]], np.int32),
            "is_final": np.array([[final]], np.bool_),
            "request_key": np.array([[job.key]], np.uint64),
        }
        if job.perf_metrics:
            outputs.update(perf_metrics(job.request))
        if job.request.params.return_log_probs:
            outputs.update(log_probs(job.request, new))
        return outputs

    def _close(self, job: Job, outputs: dict[str, np.ndarray] | None, error: str | None) -> None:
        if job.closed:
            return
        job.closed = True
        self._observe("finished", job)  # before the client hears of it, so metrics never lag an answer
        self._send(job, outputs, error, True)

    def _send(self, job: Job, outputs: dict[str, np.ndarray] | None, error: str | None, final: bool) -> None:
        """Queue a response for the sender thread. A send is a round trip to tritonserver (150-280 µs, measured
        by scripts/python_backend_costs.py; the python backend releases the GIL while it waits), so at 16
        streams the engine thread would wait 2-4 ms a step; one thread keeps each job's responses in order."""
        self._outbox.put((job, outputs, error, final))

    def _send_loop(self) -> None:
        """respond to each queued response, with a failure kept to its job: its request is cancelled (a flag the
        engine reads at its next step), no one else notices."""
        while (item := self._outbox.get()) is not None:
            job, outputs, error, final = item
            try:
                self._respond(job, outputs, error, final)
            except Exception:  # noqa: BLE001 - a broken sender (client gone) costs only its own request
                job.closed = True
                if job.request is not None and not job.request.done:
                    self.engine.cancel(job.request)

    def _fail_all(self, message: str) -> None:
        for job in self._live:
            if not job.closed:
                self.engine.cancel(job.request)
                self._close(job, None, message)


def perf_metrics(request: Request) -> dict[str, np.ndarray]:
    """TensorRT-LLM's speculative perf outputs: drafts offered for verification, drafts accepted."""
    verified, accepted = request.stats.draft_tokens_verified, request.stats.draft_tokens_accepted
    return {
        "acceptance_rate": np.array([[accepted / verified if verified else 0.0]], np.float32),
        "total_accepted_draft_tokens": np.array([[accepted]], np.int32),
        "total_draft_tokens": np.array([[verified]], np.int32),
    }


def log_probs(request: Request, start: int) -> dict[str, np.ndarray]:
    """TensorRT-LLM's log-prob outputs (beam width 1): the log-probs of output ids from `start` on, and the sum
    of all so far."""
    logprobs = request.output_logprobs
    return {"output_log_probs": np.asarray(logprobs[start:], np.float32).reshape(1, 1, -1),
            "cum_log_probs": np.array([[sum(logprobs)]], np.float32)}


def _drain(inbox: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


# ---- the served engine ---------------------------------------------------------------------------
def engine_options(model_config: dict) -> EngineOptions:
    """The engine the `dspark_bls` model serves, from the parameters `dspark-trt package` writes into its
    config.pbtxt (Triton's model config JSON: `parameters { key: ... value { string_value: ... } }`); its
    engine files are checked against their manifest when it is built."""
    raw = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
    if "engine_dir" not in raw:
        raise DSparkError("dspark_bls config has no 'engine_dir' parameter (fill it with `dspark-trt package`)")
    options = EngineOptions(engines=raw["engine_dir"], check_files=True)
    for name in ("schedule", "cost_table", "calibration"):
        if raw.get(name):
            setattr(options, name, raw[name])
    for name in ("gamma", "num_slots", "max_batch_tokens", "max_queue_size"):
        if raw.get(name):
            try:
                setattr(options, name, int(raw[name]))
            except ValueError:
                raise DSparkError(f"dspark_bls parameter {name} must be an integer, got {raw[name]!r}") from None
    return options


def served_limits(engine: Engine) -> Limits:
    """What request parsing checks a request against: the served engine's vocabulary and context."""
    runtime = engine.runtime
    return Limits(vocab_size=runtime.vocab_size, max_seq_len=runtime.max_seq_len,
                  eos_ids=tuple(runtime.eos_token_ids))


def describe(options: EngineOptions) -> str:
    """One line for logs: what is served and how (the engine directory, not a target name, says what)."""
    return json.dumps({k: v for k, v in vars(options).items() if v is not None and k not in ("target", "draft")})
