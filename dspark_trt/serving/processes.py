"""The python model processes ("stubs") of a running tritonserver, read from /proc.

tritonserver 2.51 starts one `triton_python_backend_stub` per model instance as its direct child, with
the instance name (`dspark_target_0_0`) and the shared-memory region it talks through on the command
line. Killed stubs are never restarted by the server, so the supervisor watches this list; the regions
of killed processes stay in /dev/shm unless someone removes them (TritonServer does when it ends).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
# the stub's argv: binary, model.py, shm region, shm default size, shm growth, parent pid, backend dir,
# ipc handle, instance name, runtime model dir
_SHM_ARG, _INSTANCE_ARG = 2, 8


@dataclass(frozen=True)
class Stub:
    """One python model instance's process."""

    instance: str  # e.g. dspark_target_0_0
    pid: int
    shm_region: str

    @property
    def model(self) -> str:
        return self.instance.rsplit("_", 2)[0]


def stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/PID/stat file after the command name (which may hold spaces and parentheses):
    [0] state, [1] parent pid, [11] utime, [12] stime. OSError if the process is gone."""
    return stat.read_text().rsplit(")", 1)[1].split()


def python_stubs(server_pid: int) -> dict[str, Stub]:
    """The live stub processes whose parent is server_pid, by instance name (zombies have no command line,
    so a killed stub drops out at once)."""
    stubs = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int(stat_fields(proc / "stat")[1])
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
        if parent == server_pid and Path(argv[0].decode()).name == STUB_NAME and len(argv) > _INSTANCE_ARG:
            stub = Stub(argv[_INSTANCE_ARG].decode(), int(proc.name), argv[_SHM_ARG].decode())
            stubs[stub.instance] = stub
    return stubs


def remove_shm_regions(stubs: list[Stub]) -> None:
    """Unlink the shared-memory files of stubs that are gone (processes still mapping one keep it)."""
    for stub in stubs:
        if "/" not in stub.shm_region:
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / stub.shm_region).unlink()


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
            fields = stat_fields(stat)
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time one process has used so far, in seconds (0 if it is gone)."""
    try:
        fields = stat_fields(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15 of stat


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of pid and every live process below it: a tritonserver with all its stubs."""
    return sum(cpu_seconds(p) for p in descendants(pid))


def tree_rss_mb(pid: int) -> float:
    """Resident set size of pid and every process below it, in MB: a tritonserver with all its stubs."""
    return sum(rss_mb(p) for p in descendants(pid))
