"""The default (target, drafter) pair of `serve` and the served benchmarks: its engines built once into a cache
directory (build-engines), re-packaged into a fresh model repository every start, by default with the dspark
schedule and the cost table of these engines on this machine (profiled on the first start, then cached)."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

from dspark_trt import cache
from dspark_trt.errors import DSparkError
from dspark_trt.serving.package import PackageOptions

DEFAULT_DRAFTS = {"smollm2": "default"}  # target alias -> the drafter that ships for it


def default_engines(target: str, draft: str | None, cache_dir: str | None) -> Path:
    """Engines for (target, draft), built once into the cache directory (again over a build that an older
    dspark-trt made, which lacks a graph this one runs)."""
    from dspark_trt.build.pipeline import BuildOptions, build_engines
    from dspark_trt.graphs.manifest import is_current_build

    cache = _cache(cache_dir)
    key = _key(target, draft)
    engines = cache / f"engines-{key}"
    if not is_current_build(engines):  # none yet, or built by an older dspark-trt
        _say(f"building engines for target {target!r}" + (f" and drafter {draft!r}" if draft else "")
             + f" into {engines} (first start, or engines of an older dspark-trt)")
        staging = cache / f".engines-{key}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        build_engines(BuildOptions(out=str(staging), target=target, draft=draft))
        shutil.rmtree(engines, ignore_errors=True)
        staging.rename(engines)
    return engines


def default_options(target: str, draft: str | None, cache_dir: str | None, schedule: str | None = None,
                    cost_table: str | None = None) -> PackageOptions:
    """What `serve` packages for (target, draft): its cached engines, `schedule` (default: default_schedule's),
    for dspark/async `cost_table` or the cached one of these engines, and the drafter's own calibration (also for
    engines cached before they carried it). The served benchmarks run their in-process engine on the same."""
    from dspark_trt.graphs.manifest import read_manifest
    from dspark_trt.models.drafter_checkpoint import stored_calibration
    from dspark_trt.serving.package import resolve_defaults

    if draft is None and schedule not in (None, "off"):
        raise DSparkError(f"--schedule {schedule} needs a drafter: pass --draft DIR")
    engines = default_engines(target, draft, cache_dir)
    if schedule == "off" or draft is None:
        _say("SPECULATION OFF: serving the target alone (plain autoregressive decoding)"
             + ("" if draft else f"; no drafter ships for target {target!r}: pass --draft DIR"))
    calibration = stored_calibration(draft)
    options = PackageOptions(engines=str(engines), out=str(_cache(cache_dir) / f"repo-{_key(target, draft)}"),
                             schedule=schedule, cost_table=cost_table, calibration=calibration and str(calibration))
    return resolve_defaults(options, read_manifest(engines), log=_say)


def default_repository(options: PackageOptions) -> Path:
    """A fresh repository at options.out (default_options'), written again on every start."""
    from dspark_trt.serving.package import package_repository

    shutil.rmtree(options.out, ignore_errors=True)
    return package_repository(options, log=_say)


def _cache(cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir else cache.cache_dir("serve")


def _key(target: str, draft: str | None) -> str:
    """The cache key of (target, draft): their names plus the drafter's weights, so that a new shipped drafter
    (`default` names whatever this version ships) is built afresh."""
    from dspark_trt.models.drafter_checkpoint import resolve_drafter

    weights = resolve_drafter(draft) / "model.safetensors" if draft is not None else None
    digest = ""
    if weights is not None and weights.is_file():
        stat = weights.stat()
        digest = _file_digest(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
    return hashlib.sha256(f"{target}|{draft}|{digest}".encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per (path, size, modification time) in a process: a start asks for the key of the
    same drafter several times, and its weights are tens of MB."""
    from dspark_trt.graphs.manifest import sha256

    return sha256(Path(path))


def _say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)
