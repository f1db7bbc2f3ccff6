"""The cost table of the cost-aware schedules (dspark, async) when none is given: profiled once for these
engines on this machine, then reused.

A cost table is only true of the engines it timed on the machine that timed them, so an entry is keyed by
both: an engine directory's manifest (it carries every graph's sha256), or for the torch runtime the
target's and drafter's weight files (path, size, modification time: hashing gigabytes on every run would
cost more than it saves); and the machine (CPU model, cores, thread counts, runtime library versions, GPU).
Entries live in `cache_dir()/cost-tables`. The first run profiles a reduced grid (AUTO_REQUESTS requests,
AUTO_ROW_TOKENS tokens each, AUTO_REPEATS repeats: under a minute for the default engines on two busy cores) with a progress bar; concurrent first runs queue on
a lock instead of profiling at once (each would time the other's load), and a table is written to a
temporary file and renamed, so no reader ever sees half of one. An entry that does not parse, or whose
stored identity is not the one asked for, is profiled again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from dspark_trt import __version__
from dspark_trt.cache import cache_dir
from dspark_trt.cpu import cpu_model
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.profiler import plan_profile, profile_runtime
from dspark_trt.errors import DSparkError, ModelNotFoundError
from dspark_trt.spec.cost_table import CostTable

FORMAT = 1  # bump when the profile or the identity changes meaning: older entries then miss
AUTO_REQUESTS = (1, 2, 4, 8)  # per-R rows for passes of up to 8 requests (the served slots); more are clamped
AUTO_ROW_TOKENS = (1, 2, 4)  # tokens per request in a row, and block + 1; linear between them
AUTO_CONTEXT_LEN = 128
AUTO_REPEATS = 3
LIBRARIES = ("torch", "numpy", "onnxruntime", "onnxruntime-extensions", "tensorrt")

Log = Callable[[str], None]


@dataclass(frozen=True)
class CachedCostTable:
    """A cost table, where it is kept, and whether this run profiled it."""

    path: Path
    table: CostTable
    fresh: bool

    def describe(self) -> str:
        return f"cost table {self.path} ({'freshly profiled' if self.fresh else 'cached'})"


def default_cost_table(options: EngineOptions, log: Log) -> CachedCostTable:
    """The cached cost table of the engines `options` name (engines, or target + draft) on this machine,
    profiled first when there is none yet."""
    identity = {"format": FORMAT, "engines": engines_identity(options), "machine": machine_identity(),
                "grid": {"requests": list(AUTO_REQUESTS), "row_tokens": list(AUTO_ROW_TOKENS),
                         "context_len": AUTO_CONTEXT_LEN, "repeats": AUTO_REPEATS}}
    return cached_cost_table(identity, lambda: _profile(options), log)


def cached_cost_table(identity: dict, profile: Callable[[], CostTable], log: Log) -> CachedCostTable:
    """The entry for `identity`, or profile() written as it (one process at a time per entry)."""
    identity = json.loads(json.dumps(identity))  # as it reads back from JSON, so the two compare equal
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir("cost-tables")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.json"
    with _locked(directory / f"{key}.lock", log):
        table = _read(path, identity, log)
        if table is not None:
            return CachedCostTable(path, table, fresh=False)
        log(f"profiling these engines on this machine once for the cost-aware schedule; it is cached as {path}")
        start = time.perf_counter()
        table = profile()
        table.metadata["cache_identity"] = identity
        _write_atomically(table, path)
        log(f"profiled in {time.perf_counter() - start:.0f} s")
        return CachedCostTable(path, table, fresh=True)


def engines_identity(options: EngineOptions) -> dict:
    """What the table times: an engine directory by its manifest, else the torch runtime's weight files."""
    if options.engines is not None:
        from dspark_trt.graphs.manifest import MANIFEST, read_manifest, sha256

        read_manifest(options.engines)  # a clear error for a directory that is not one
        return {"manifest_sha256": sha256(Path(options.engines) / MANIFEST)}
    from dspark_trt.models.drafter_checkpoint import resolve_drafter
    from dspark_trt.models.sources import resolve_model

    source = resolve_model(options.target)
    target = [source.path] if source.kind == "gguf" else _weight_files(source.path)
    draft = _stamps(_weight_files(resolve_drafter(options.draft))) if options.draft else None
    return {"runtime": "torch", "target": _stamps(target), "draft": draft}


def machine_identity() -> dict:
    """What makes a profile of the same engines invalid elsewhere."""
    import torch

    libraries = {"dspark-trt": __version__}
    for name in LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "arch": platform.machine(),
            "python": platform.python_version(), "libraries": libraries,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _profile(options: EngineOptions) -> CostTable:
    """Profile a runtime of its own (AUTO_REQUESTS slots, short context) over the auto grid, with a bar."""
    from tqdm import tqdm

    engine, _ = build_engine(dataclasses.replace(options, schedule="fixed", cost_table=None,
                                                 num_slots=max(AUTO_REQUESTS), max_seq_len=AUTO_CONTEXT_LEN + 256))
    runtime = engine.runtime
    most = runtime.block_size + 1  # tokens a request verifies at most
    sizes = sorted(set(AUTO_REQUESTS) | {max(AUTO_REQUESTS) * most})
    row_tokens = sorted({m for m in AUTO_ROW_TOKENS if m < most} | {most})
    with tqdm(total=plan_profile(runtime, sizes, row_tokens).measurements, desc="profile", unit="pass",
              file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(message: str) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update()

        return profile_runtime(runtime, sizes, AUTO_CONTEXT_LEN, AUTO_REPEATS, progress, row_tokens)


def _read(path: Path, identity: dict, log: Log) -> CostTable | None:
    """The entry at path if it parses and was profiled for `identity`; None (and why, logged) if not."""
    if not path.is_file():
        return None
    try:
        table = CostTable.from_json(path)
    except DSparkError as exc:
        log(f"the cached cost table {path} is unreadable ({exc}); profiling again")
        return None
    if not isinstance(table.metadata, dict) or table.metadata.get("cache_identity") != identity:
        log(f"the cached cost table {path} was profiled for other engines or another machine; profiling again")
        return None
    return table


def _write_atomically(table: CostTable, path: Path) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        table.to_json(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _locked(path: Path, log: Log) -> Iterator[None]:
    """An exclusive flock on `path` for the with-block; says so when it has to wait for another process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another process is profiling these engines; waiting for its cost table")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _weight_files(directory: Path) -> list[Path]:
    if not Path(directory).is_dir():
        raise ModelNotFoundError(f"{directory}: not a model directory")
    return sorted(p for p in Path(directory).iterdir() if p.name == "config.json" or p.suffix == ".safetensors")


def _stamps(files: list[Path]) -> list[list]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
