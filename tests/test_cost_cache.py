"""The cost-table cache of the default dspark schedule: one profile per engines and machine, reused after;
unreadable or foreign entries are profiled again; concurrent first runs profile once; no half-written entry."""
import json
import threading

import pytest

from dspark_trt.engine import cost_cache
from dspark_trt.engine.cost_cache import cached_cost_table, engines_identity, machine_identity
from dspark_trt.engine.factory import EngineOptions
from dspark_trt.spec.cost_table import CostTable

IDENTITY = {"engines": {"manifest_sha256": "ab" * 32}, "machine": {"cpu": "test"}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_TRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cost-tables"


class Profiler:
    """A stand-in for profiling: counts its calls, returns a synthetic table."""

    def __init__(self, base_sps=100.0):
        self.calls, self.base_sps = 0, base_sps

    def __call__(self) -> CostTable:
        self.calls += 1
        return CostTable.synthetic(base_sps=self.base_sps)


def test_first_call_profiles_and_writes_the_entry_later_calls_read_it(cache):
    profile, messages = Profiler(), []
    first = cached_cost_table(IDENTITY, profile, messages.append)
    assert first.fresh and profile.calls == 1 and first.path.parent == cache
    assert "freshly profiled" in first.describe() and any("profiling" in m for m in messages)
    assert json.loads(first.path.read_text())["metadata"]["cache_identity"] == IDENTITY
    stamp = first.path.stat().st_mtime_ns
    second = cached_cost_table(IDENTITY, profile, messages.append)
    assert not second.fresh and profile.calls == 1 and "(cached)" in second.describe()
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp
    assert second.table.steps_per_second == first.table.steps_per_second
    other = cached_cost_table({**IDENTITY, "machine": {"cpu": "another"}}, profile, messages.append)
    assert other.fresh and profile.calls == 2 and other.path != first.path


@pytest.mark.parametrize("content", ["{", "", '{"batch_sizes": [1], "steps_per_second": [0]}', "[1, 2]"])
def test_an_unreadable_entry_is_profiled_again(cache, content):
    first = cached_cost_table(IDENTITY, Profiler(), lambda m: None)
    first.path.write_text(content)
    profile, messages = Profiler(), []
    again = cached_cost_table(IDENTITY, profile, messages.append)
    assert again.fresh and profile.calls == 1 and any("unreadable" in m for m in messages)
    assert CostTable.from_json(again.path).metadata["cache_identity"] == IDENTITY


def test_an_entry_profiled_for_other_engines_or_another_machine_is_profiled_again(cache):
    first = cached_cost_table(IDENTITY, Profiler(), lambda m: None)
    foreign = first.table
    foreign.metadata["cache_identity"] = {**IDENTITY, "machine": {"cpu": "another"}}
    foreign.to_json(first.path)
    profile, messages = Profiler(base_sps=50.0), []
    again = cached_cost_table(IDENTITY, profile, messages.append)
    assert again.fresh and profile.calls == 1 and any("other engines or another machine" in m for m in messages)
    assert again.table.steps_per_second[0] == 50.0


def test_a_failed_profile_or_write_leaves_no_entry_and_no_half_file(cache, monkeypatch):
    def broken():
        raise RuntimeError("profile failed")

    with pytest.raises(RuntimeError):
        cached_cost_table(IDENTITY, broken, lambda m: None)
    assert not list(cache.glob("*.json")) and not list(cache.glob(".*"))

    def half_written(self, path):
        with open(path, "w") as f:
            f.write('{"batch_sizes": [1, 2')
        raise OSError("disk full")

    monkeypatch.setattr(CostTable, "to_json", half_written)
    with pytest.raises(OSError, match="disk full"):
        cached_cost_table(IDENTITY, Profiler(), lambda m: None)
    assert not list(cache.glob("*.json")) and not list(cache.glob(".*"))  # the entry was never half there


def test_concurrent_first_runs_profile_once_and_both_get_the_table(cache):
    """The second caller waits on the first one's lock (it says so) and then reads its entry."""
    started, second_waits = threading.Event(), threading.Event()
    calls = []

    def slow_profile():
        calls.append(1)
        started.set()
        assert second_waits.wait(30), "the second caller never waited for the lock"
        return CostTable.synthetic()

    results = {}

    def run(name, profile, log):
        results[name] = cached_cost_table(IDENTITY, profile, log)

    first = threading.Thread(target=run, args=("first", slow_profile, lambda m: None))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=run, args=("second", Profiler(), lambda m: "waiting" in m and second_waits.set()))
    second.start()
    first.join(60)
    second.join(60)
    assert len(calls) == 1 and results["first"].fresh and not results["second"].fresh
    assert results["second"].path == results["first"].path
    assert results["second"].table.steps_per_second == results["first"].table.steps_per_second


def test_the_key_follows_the_engines_and_the_machine(tmp_path, monkeypatch):
    from dspark_trt.graphs.manifest import FORMAT

    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "manifest.json").write_text(json.dumps({"format": FORMAT, "graphs": {}, "build": 1}))
    before = engines_identity(EngineOptions(engines=str(engines)))
    (engines / "manifest.json").write_text(json.dumps({"format": FORMAT, "graphs": {}, "build": 2}))
    assert engines_identity(EngineOptions(engines=str(engines))) != before

    target, draft = tmp_path / "target", tmp_path / "draft"
    for directory in (target, draft):
        directory.mkdir()
        (directory / "config.json").write_text("{}")
        (directory / "model.safetensors").write_bytes(b"weights")
    options = EngineOptions(target=str(target), draft=str(draft))
    before = engines_identity(options)
    assert before["runtime"] == "torch" and len(before["target"]) == len(before["draft"]) == 2
    (draft / "model.safetensors").write_bytes(b"other weights")
    assert engines_identity(options) != before

    machine = machine_identity()
    assert machine["cpu"] and machine["usable_cpus"] >= 1 and machine["logical_cpus"] >= machine["usable_cpus"]
    assert {"dspark-trt", "torch", "onnxruntime"} <= set(machine["libraries"])
    monkeypatch.setattr(cost_cache.os, "sched_getaffinity", lambda pid: {0})
    assert machine_identity()["usable_cpus"] == 1
