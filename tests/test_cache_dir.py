"""One cache root for everything the product keeps between runs, and every user of it follows an override."""
from __future__ import annotations

from pathlib import Path

from dspark_trt.cache import cache_dir


def test_cache_dir_prefers_dspark_trt_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DSPARK_TRT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "dspark-trt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("cost-tables") == tmp_path / "xdg" / "dspark-trt" / "cost-tables"
    monkeypatch.setenv("DSPARK_TRT_CACHE", str(tmp_path / "mine"))
    assert cache_dir("data", "responses.jsonl") == tmp_path / "mine" / "data" / "responses.jsonl"


def test_every_cache_user_lands_under_the_override(monkeypatch, tmp_path):
    """The default serve pair, the tritonserver stub copy and the converted tokenizers all move with
    DSPARK_TRT_CACHE (they used to compute their own roots, one of them `dspark_trt`)."""
    from dspark_trt.serving import default_pair, tritonserver

    root = tmp_path / "cache"
    monkeypatch.setenv("DSPARK_TRT_CACHE", str(root))
    assert default_pair._cache(None) == root / "serve"
    assert default_pair._cache(str(tmp_path / "given")) == tmp_path / "given"
    backends = tritonserver.prepare_backend_directory(tritonserver.find_tritonserver())
    assert backends.is_relative_to(root) and (backends / "python").is_dir()
