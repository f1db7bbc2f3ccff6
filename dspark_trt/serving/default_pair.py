"""The default (target, drafter) pair of `serve` and the served benchmarks: its engines built once into a cache
directory (build-engines), re-packaged into a fresh model repository every start."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path


def default_engines(target: str, draft: str | None, cache_dir: str | None) -> Path:
    """Engines for (target, draft), built once into the cache directory."""
    from dspark_trt.build.pipeline import BuildOptions, build_engines

    cache = _cache(cache_dir)
    key = _key(target, draft)
    engines = cache / f"engines-{key}"
    if not (engines / "manifest.json").is_file():
        _say(f"building engines for target {target!r}" + (f" and drafter {draft!r}" if draft else "")
             + f" into {engines} (first start only)")
        staging = cache / f".engines-{key}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        build_engines(BuildOptions(out=str(staging), target=target, draft=draft))
        shutil.rmtree(engines, ignore_errors=True)
        staging.rename(engines)
    return engines


def default_repository(target: str, draft: str | None, cache_dir: str | None) -> Path:
    """The cached engines of (target, draft), re-packaged into a fresh repository every start."""
    from dspark_trt.serving.package import PackageOptions, package_repository

    engines = default_engines(target, draft, cache_dir)
    if draft is None:
        _say("SPECULATION OFF: no trained DSpark drafter ships for the default target yet; serving the target "
             "alone (plain autoregressive decoding). Pass --draft DIR, or package your own engines and use --repo.")
    repo = _cache(cache_dir) / f"repo-{_key(target, draft)}"
    shutil.rmtree(repo, ignore_errors=True)
    return package_repository(PackageOptions(engines=str(engines), out=str(repo),
                                             schedule="fixed" if draft else "off"))


def _cache(cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "dspark-trt" / "serve"


def _key(target: str, draft: str | None) -> str:
    return hashlib.sha256(f"{target}|{draft}".encode()).hexdigest()[:12]


def _say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)
