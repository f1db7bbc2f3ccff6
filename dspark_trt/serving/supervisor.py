"""Keep a served repository serving: when a model process or tritonserver itself dies, restart the server.

What tritonserver 2.51 does by itself, measured (docs/recovery.md): a killed python model process
("stub") is never restarted; every later request to it fails with "Stub process ... is not healthy"
while every readiness endpoint keeps answering 200; the streams in flight in a killed decoupled model
(dspark_bls) are never answered again. Replacing only the dead model in place (explicit model control)
was tried and left the server hanging or crashing (SIGSEGV) after the reload, and reloading the ensemble
reloads dspark_bls too, whose old instance would share the target's slots with the new one. So the
supervisor restarts the whole server: one path for every fault, every process and cache started afresh.

`dspark-trt serve` runs it beside the server. It polls the server process and its stubs every POLL_S and
on a death: SIGTERMs the server (requests in flight end: with "the server is recovering" when dspark_target
or dspark_draft died and the orchestrator met it first, else with "the server is restarting or stopping" from
the orchestrator or with their connection closing, always so for the streams of a dead dspark_bls), SIGKILLs what is left after GRACE_S
(TritonServer removes the shared memory of its stubs), and starts it again on the same ports. Until it is
ready again its endpoints do not answer, so every readiness probe fails; serve's own /live
(health_endpoint.py) stays up. A restart that fails `max_failed_restarts` times in a row gives up
(DSparkError): serve exits, the container restarts.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from dspark_trt.errors import DSparkError
from dspark_trt.serving.processes import python_stubs
from dspark_trt.serving.tritonserver import TritonServer

SERVER = "tritonserver"  # the fault label of the server process itself
POLL_S = 0.5
# SIGTERM to SIGKILL. Measured: requests in flight have their errors within ~1 s of the SIGTERM and dspark_bls
# has answered its queue within ~3 s; after that tritonserver only waits for the dead model's unload, which
# never comes, until its own exit timeout.
GRACE_S = 3


@dataclass
class Health:
    """What the supervisor reports (health_endpoint.py serves it): counts since it started."""

    faults: collections.Counter = field(default_factory=collections.Counter)  # by process
    recoveries: int = 0
    recovering: bool = False
    last_recovery_s: float | None = None
    given_up: bool = False


class Supervisor:
    """Owns `server`: start() it, then run() until stopped."""

    def __init__(self, server: TritonServer, log: Callable[[str], None] = lambda message: None,
                 start_timeout_s: float = 600, max_failed_restarts: int = 3):
        self.server = server
        self.health = Health()
        self._log = log
        self._start_timeout_s = start_timeout_s
        self._max_failed_restarts = max_failed_restarts

    @property
    def processes(self) -> list[str]:
        """Every process watched: the server and the models whose stubs it runs."""
        return [SERVER, *sorted({stub.model for stub in self.server.stubs.values()})]

    def start(self) -> None:
        self.server.start(self._start_timeout_s)

    def run(self, stop: threading.Event | None = None) -> None:
        """Watch and recover until stop is set (forever without one); DSparkError once it gives up."""
        stop = stop or threading.Event()
        while not stop.wait(POLL_S):
            self.check()

    def check(self) -> None:
        """One look at the processes; restarts the server before it returns if one died."""
        alive = python_stubs(self.server.pid) if self.server.is_running() else {}
        if not self.server.is_running():  # asked again after the scan: a server dying during it is its fault
            self._recover({SERVER})
            return
        dead = {stub.model for name, stub in self.server.stubs.items() if alive.get(name) != stub}  # gone or replaced
        if dead:
            self._recover(dead)

    def _recover(self, processes: set[str]) -> None:
        began = time.monotonic()
        self.health.faults.update(processes)
        self.health.recovering = True
        self._log(f"{', '.join(sorted(processes))} died: restarting tritonserver")
        for attempt in range(1, self._max_failed_restarts + 1):
            try:
                self.server.restart(grace_s=GRACE_S, timeout_s=self._start_timeout_s)
                break
            except DSparkError as exc:
                self._log(f"restart {attempt} of {self._max_failed_restarts} failed: {exc}")
        else:
            self.health.given_up = True
            raise DSparkError(f"tritonserver could not be restarted ({self._max_failed_restarts} attempts); "
                              "giving up")
        self.health.recoveries += 1
        self.health.last_recovery_s = time.monotonic() - began
        self.health.recovering = False
        self._log(f"recovered in {self.health.last_recovery_s:.1f} s")
