"""bench load: the aggregation on hand-built records, mode parsing, and a tiny in-process sweep end to end
(JSON internally consistent, greedy outputs of every mode equal mode off, valid PNGs)."""
import json

import matplotlib.pyplot as plt
import pytest
from test_triton_serving import NEVER, engines, pair  # noqa: F401 - the tiny pair and its engines, shared

from dspark_trt.bench.load import (RequestRecord, greedy_mismatches, pareto_front, parse_concurrency, parse_modes,
                                   percentile, summarize)
from dspark_trt.cli import main as cli_main
from dspark_trt.errors import DSparkError


def records():
    return [
        RequestRecord(prompt=0, submit=0.0, first_token=0.5, finish=2.0, tokens=10, verified=[2, 4], accepted=[3, 5]),
        RequestRecord(prompt=1, submit=1.0, first_token=1.2, finish=5.0, tokens=8, verified=[0], accepted=[1]),
        RequestRecord(prompt=2, submit=2.0, first_token=2.1, finish=3.0, tokens=3),
    ]


def test_summary_of_hand_built_records():
    s = summarize(records())
    # per-user tok/s: 10/2 = 5, 8/4 = 2, 3/1 = 3 -> sorted 2, 3, 5; p10 at rank 0.2 -> 2 + 0.2 * (3 - 2)
    assert s["per_user_tokens_per_second_median"] == pytest.approx(3.0)
    assert s["per_user_tokens_per_second_p10"] == pytest.approx(2.2)
    # TTFT: 0.5, 0.2, 0.1 -> sorted 0.1, 0.2, 0.5; p90 at rank 1.8 -> 0.2 + 0.8 * 0.3
    assert s["ttft_seconds_median"] == pytest.approx(0.2)
    assert s["ttft_seconds_p90"] == pytest.approx(0.44)
    assert s["tokens"] == 21 and s["seconds"] == pytest.approx(5.0)
    assert s["aggregate_tokens_per_second"] == pytest.approx(21 / 5)
    assert s["mean_verify_length"] == pytest.approx((2 + 4 + 0) / 3)  # pooled over rounds, not requests
    assert s["tau"] == pytest.approx((3 + 5 + 1) / 3)
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        summarize([])


def test_pareto_front_keeps_points_nothing_beats_on_both_axes():
    points = [(1.0, 10.0), (2.0, 8.0), (1.5, 7.0), (3.0, 2.0), (2.0, 8.0), (0.5, 10.0)]
    # (1.5, 7) loses to (2, 8); (0.5, 10) loses to (1, 10); the duplicate (2, 8) appears once
    assert pareto_front(points) == [(1.0, 10.0), (2.0, 8.0), (3.0, 2.0)]


def test_modes_and_concurrency_parse_or_name_the_problem():
    modes = parse_modes("off, fixed3,dspark,async,threshold")
    assert [(m.name, m.schedule, m.gamma) for m in modes] == [
        ("off", "off", None), ("fixed3", "fixed", 3), ("dspark", "dspark", None), ("async", "async", None),
        ("threshold", "threshold", None)]
    assert [m.needs_cost_table for m in modes] == [False, False, True, True, False]
    assert all(m.draft_gate for m in modes)
    ungated = parse_modes("dspark-ungated,async-ungated")
    assert [(m.schedule, m.draft_gate, m.needs_cost_table) for m in ungated] == [("dspark", False, True),
                                                                                ("async", False, True)]
    for bad, match in (("fixed", "unknown mode 'fixed'"), ("fast", "unknown mode 'fast'"), ("off,off", "twice"),
                       ("fixed3-ungated", "unknown mode"), ("", "empty")):
        with pytest.raises(DSparkError, match=match):
            parse_modes(bad)
    assert parse_concurrency("4,1,2,4") == [1, 2, 4]
    for bad in ("0,1", "a", ""):
        with pytest.raises(DSparkError, match="--concurrency"):
            parse_concurrency(bad)


def test_greedy_mismatches_compare_each_prompt_with_mode_off():
    def point(mode, c, digests):
        return {"mode": mode, "concurrency": c, "per_request": [{"prompt": p, "output_digest": d}
                                                                 for p, d in digests.items()]}

    points = [point("off", 1, {0: "a", 1: "b"}), point("fixed3", 1, {0: "a", 1: "b"}),
              point("fixed3", 2, {0: "a", 1: "x"})]
    assert greedy_mismatches(points) == ["fixed3 C=2 prompt 1"]


def _valid_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_tiny_in_process_sweep_writes_a_consistent_json_and_pngs(pair, tmp_path, capsys):  # noqa: F811
    modes = ["off", "fixed1", "fixed4", "threshold", "dspark", "async"]
    assert cli_main(["bench", "load", "--target", str(pair / "target"), "--draft", str(pair / "draft"),
                     "--prompts-file", str(pair / "prompts.jsonl"), "--limit", "3", "--modes", ",".join(modes),
                     "--concurrency", "1,2", "--requests", "2", "--max-tokens", "8", "--out", str(tmp_path),
                     "--llama-cpp-server"]) == 0
    printed = capsys.readouterr()
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["modes"] == modes and result["concurrency"] == [1, 2]
    # llama.cpp reads GGUF only: the tiny target is a Hugging Face directory, so its row says why it is skipped
    reason = result["peers"]["llama.cpp server"]["skipped"]
    assert "not a GGUF file" in reason and f"llama.cpp server: skipped ({reason})" in printed.out
    assert result["cost_table_source"] == "profiled at start"  # no --cost-table: measured once, written next to it
    assert json.loads((tmp_path / "load_cost_table.json").read_text())["steps_per_second"]
    assert result["environment"]["git_revision"] and result["environment"]["command"]
    assert [(p["mode"], p["concurrency"]) for p in result["points"]] == [(m, c) for m in modes for c in (1, 2)]
    for point in result["points"]:
        per_request = point["per_request"]
        assert len(per_request) == point["requests"] == 2
        assert point["tokens"] == sum(r["tokens"] for r in per_request)
        assert all(1 <= r["tokens"] <= 8 for r in per_request)
        assert point["seconds"] == pytest.approx(max(r["finish"] for r in per_request)
                                                 - min(r["submit"] for r in per_request))
        assert point["aggregate_tokens_per_second"] == pytest.approx(point["tokens"] / point["seconds"])
        assert all(r["submit"] <= r["first_token"] <= r["finish"] for r in per_request)
        verified = [v for r in per_request for v in r["verified"]]
        assert point["mean_verify_length"] == pytest.approx(sum(verified) / len(verified))
        cap = {"off": 0, "fixed1": 1}.get(point["mode"], 4)  # the tiny drafter's block size is 4
        assert max(verified) <= cap
        if point["mode"] == "off":
            assert point["tau"] == 1.0
        if point["mode"] == "fixed4":  # fixed γ verifies all γ drafts unless the token budget is smaller
            assert max(verified) == 4
        # each round commits its accepted drafts + 1; the first token comes from prefill
        for r in per_request:
            assert sum(r["accepted"]) >= r["tokens"] - 1
        # closed loop at concurrency 1: the second request is submitted after the first finished
        if point["concurrency"] == 1:
            first, second = sorted(per_request, key=lambda r: r["submit"])
            assert second["submit"] >= first["finish"]
    assert result["greedy_mismatches_vs_off"] == []
    assert {p["prompt"] for p in result["points"][0]["per_request"]} == {0, 1}  # round-robin over the prompts
    for name in ("load_frontier.png", "load_budget.png"):
        _valid_png(tmp_path / name)
    assert "fixed4" in printed.out and "agg tok/s" in printed.out


def test_load_command_names_bad_options(pair, tmp_path, capsys):  # noqa: F811
    base = ["bench", "load", "--target", str(pair / "target"), "--prompts-file", str(pair / "prompts.jsonl"),
            "--out", str(tmp_path)]
    assert cli_main([*base, "--modes", "off,fixed3"]) == 2
    assert "need a drafter (--draft)" in capsys.readouterr().err
    assert cli_main([*base, "--draft", str(pair / "draft"), "--modes", "fixed9", "--requests", "1",
                     "--concurrency", "1"]) == 2
    assert "gamma must be in 0..4" in capsys.readouterr().err
    assert cli_main([*base, "--modes", "off", "--requests", "2", "--seconds", "1"]) == 2
    assert "exactly one of --requests and --seconds" in capsys.readouterr().err


@pytest.mark.server
def test_served_sweep_through_tritonserver_matches_mode_off(engines, pair, tmp_path, capsys):  # noqa: F811
    assert cli_main(["bench", "load", "--served", "--engines", str(engines), "--prompts-file",
                     str(pair / "prompts.jsonl"), "--limit", "2", "--modes", "off,fixed2", "--concurrency", "1,2",
                     "--requests", "3", "--max-tokens", "8", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "load_served.json").read_text())
    assert result["driver"].startswith("tritonserver") and result["cost_table"] is None
    assert [(p["mode"], p["concurrency"]) for p in result["points"]] == [
        ("off", 1), ("off", 2), ("fixed2", 1), ("fixed2", 2)]
    for point in result["points"]:
        assert point["requests"] == 3 and point["tokens"] == sum(r["tokens"] for r in point["per_request"])
        assert all(r["submit"] <= r["first_token"] <= r["finish"] for r in point["per_request"])
        assert point["mean_verify_length"] == (0 if point["mode"] == "off" else pytest.approx(2, abs=1))
    assert result["greedy_mismatches_vs_off"] == []
    for name in ("load_served_frontier.png", "load_served_budget.png"):
        _valid_png(tmp_path / name)


def test_served_and_in_process_outputs_are_compared_per_prompt():
    from dspark_trt.bench.served import mismatched_prompts

    def record(prompt, digest):
        return RequestRecord(prompt=prompt, submit=0.0, first_token=0.1, finish=1.0, tokens=4, output_digest=digest)

    local = [record(0, "a"), record(1, "b"), record(0, "a")]
    assert mismatched_prompts(local, [record(0, "a"), record(1, "b"), record(2, "z")]) == []  # 2: not run locally
    assert mismatched_prompts(local, [record(0, "a"), record(1, "c")]) == [1]
    assert mismatched_prompts(local + [record(1, "d")], [record(0, "a")]) == [1]  # in-process differed from itself


def test_cpu_meter_counts_this_process_and_a_server_tree_apart(tmp_path):
    """CpuMeter: this process's busy loop is its own CPU, a busy child of the `server` pid is the server's."""
    import subprocess
    import sys
    import time

    from dspark_trt.bench.served import CpuMeter

    burn = "import time\ntime.sleep(0.5)\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n" \
           "open(__import__('sys').argv[1], 'w').close()\ntime.sleep(60)"
    done = tmp_path / "burnt"
    child = subprocess.Popen([sys.executable, "-c", burn, str(done)])  # sleeps first: its burn falls in the meter
    try:
        with CpuMeter(child.pid) as meter:
            end = time.process_time() + 0.3
            while time.process_time() < end:
                pass
            deadline = time.time() + 30
            while not done.exists() and time.time() < deadline:
                time.sleep(0.02)
        assert 0.28 <= meter.own_s < 0.5 and 0.35 <= meter.server_s < 1.0
        with CpuMeter() as idle:
            time.sleep(0.2)
        assert idle.own_s < 0.1 and idle.server_s == 0.0
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
@pytest.mark.server
def test_bench_served_runs_both_paths_per_concurrency_on_one_schedule(pair, tmp_path, monkeypatch, capsys):  # noqa: F811
    """bench served on the tiny pair: what `serve` would pick (dspark, a cost table profiled for these engines),
    in-process and served closed loops at each concurrency, greedy texts equal, the server's RSS sampled."""
    from pathlib import Path

    monkeypatch.setenv("DSPARK_TRT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "served.json"
    assert cli_main(["bench", "served", "--target", str(pair / "target"), "--draft", str(pair / "draft"),
                     "--cache-dir", str(tmp_path / "serve"), "--prompts-file", str(pair / "prompts.jsonl"),
                     "--limit", "3", "--concurrency", "2,1", "--seconds", "1", "--rounds", "2", "--max-tokens", "8",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schedule"] == "dspark" and Path(result["cost_table"]).parent == tmp_path / "cache" / "cost-tables"
    assert [p["concurrency"] for p in result["points"]] == [1, 2] and result["server_rss_mb_idle"] > 50
    for point in result["points"]:
        local, served = point["in_process"], point["served"]
        assert len(local["rounds"]) == len(served["rounds"]) == 2 and point["mismatched_prompts"] == []
        assert local["tokens"] == sum(r["tokens"] for r in local["rounds"]) and served["requests"] >= 2
        assert point["ratio"] == pytest.approx(served["aggregate_tokens_per_second"]
                                               / local["aggregate_tokens_per_second"])
        assert point["server_rss_mb_mean"] <= point["server_rss_mb_max"] < 4 * result["server_rss_mb_idle"]
        assert all(point["cpu_ms_per_token"][side] > 0 for side in ("in_process", "server", "client"))
    assert "served text equal to in-process: yes" in capsys.readouterr().out
    assert cli_main(["bench", "served", "--seconds", "0"]) == 2
    assert "--seconds must be > 0 and --rounds >= 1" in capsys.readouterr().err


def test_the_closed_loop_ramps_the_first_round_so_plain_decoding_is_not_in_lockstep(pair):  # noqa: F811
    """Four clients of plain decoding with equal budgets would finish every request at the same step and resubmit
    together; the first round's budgets ramp (2, 4, 6, 8 tokens), so the clients' next requests go out at
    different steps, and a ramped request's output is the prefix of its prompt's full one."""
    from dspark_trt.bench.load import closed_loop_engine, request_budget
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.models.weights import load_target
    from dspark_trt.runtimes.torch_runtime import TorchRuntime

    assert [request_budget(n, 4, 8) for n in range(6)] == [2, 4, 6, 8, 8, 8]
    target, _ = load_target(str(pair / "target"))
    engine = Engine(TorchRuntime(target, num_slots=4, max_seq_len=64))
    prompts = [[5, 6, 7], [8, 9, 10], [6, 7], [9, 5, 8, 6]]
    records = closed_loop_engine(engine, prompts, SamplingParams(max_tokens=8, stop_ids=(NEVER,)), 4, 8, None,
                                 digest_of=lambda ids: " ".join(map(str, ids)))
    assert [r.max_tokens for r in sorted(records, key=lambda r: r.submit)] == [2, 4, 6, 8, 8, 8, 8, 8]
    assert all(1 <= r.tokens <= r.max_tokens for r in records)
    first_finish = min(r.finish for r in records)
    later = sorted(r.submit for r in records if r.submit >= first_finish)  # the four sent as the others finished
    gaps = [b - a for a, b in zip(later, later[1:])]
    assert len(later) == 4
    assert min(gaps) > 1e-4  # one a step (requests sent within one step go out microseconds apart)
    full = {r.prompt: r.output_digest for r in records if r.max_tokens == 8}
    assert all(full[r.prompt].startswith(r.output_digest) for r in records)
