"""CostTable: interpolation, forced monotonicity, JSON round trip and clear errors."""
import json

import numpy as np
import pytest

from dspark_trt.errors import DSparkError
from dspark_trt.spec.cost_table import CostTable


def test_interpolates_linearly_and_clamps_beyond_measured_points():
    t = CostTable([2, 4, 8], [100.0, 80.0, 40.0])
    assert t.sps(3) == pytest.approx(90.0)  # halfway between 100 and 80
    assert t.sps(6) == pytest.approx(60.0)
    assert t.sps(1) == 100.0 and t.sps(1000) == 40.0  # clamped
    assert np.allclose(t.sps(np.array([2, 5])), [100.0, 70.0])
    with pytest.raises(ValueError, match=">= 1"):
        t.sps(0)


def test_noise_is_removed_by_isotonic_regression_and_points_are_sorted():
    # measured out of order with a noisy bump at B = 4 (faster than B = 2): the two are pooled at 92.5
    t = CostTable([4, 1, 2, 8], [95.0, 100.0, 90.0, 50.0])
    assert t.batch_sizes == [1, 2, 4, 8]
    assert t.steps_per_second == [100.0, 92.5, 92.5, 50.0]
    # draft cost is made non-decreasing in the number of requests the same way
    t = CostTable([1], [10.0], draft_requests=[1, 2, 4], draft_seconds=[0.02, 0.01, 0.03])
    assert t.draft_seconds == pytest.approx([0.015, 0.015, 0.03])
    assert t.draft_step_seconds(3) == pytest.approx(0.0225)
    assert CostTable([1], [10.0]).draft_step_seconds(5) == 0.0


def test_one_slow_measurement_at_a_small_batch_does_not_flatten_the_whole_curve():
    # B = 1 measured at 20 SPS (a hiccup) where B = 2..8 run at 30, 29, 28: a running minimum would read
    # 20 everywhere; the fit pools the hiccup with the points after it until the curve falls
    t = CostTable([1, 2, 4, 8], [20.0, 30.0, 29.0, 28.0])
    assert t.steps_per_second == pytest.approx([26.75] * 4)
    assert CostTable([1, 2, 4, 8], [20.0, 30.0, 29.0, 10.0]).steps_per_second == pytest.approx(
        [79 / 3] * 3 + [10.0])


@pytest.mark.parametrize("sizes, sps, match", [
    ([], [], "non-empty"),
    ([1, 2], [1.0], "equal length"),
    ([0, 2], [1.0, 1.0], "integers >= 1"),
    ([1, 1], [1.0, 1.0], "distinct"),
    ([1.5], [1.0], "integers"),
    ([1, 2], [1.0, float("nan")], "finite"),
    ([1, 2], [1.0, 0.0], "> 0"),
])
def test_bad_curves_are_refused(sizes, sps, match):
    with pytest.raises(ValueError, match=match):
        CostTable(sizes, sps)


def test_synthetic_is_labelled_and_non_increasing():
    t = CostTable.synthetic()
    assert "synthetic" in t.metadata["method"]
    assert t.sps(1) == t.sps(16) == 100.0 and t.sps(64) == pytest.approx(100.0 / (1 + 0.02 * 48))
    assert np.all(np.diff(t.steps_per_second) <= 0)


def test_json_round_trip_keeps_curve_and_metadata(tmp_path):
    path = tmp_path / "cost.json"
    t = CostTable([1, 8], [50.0, 25.0], [1, 4], [0.01, 0.02],
                  metadata={"runtime": "torch", "versions": {"torch": "2.13"}, "method": "median of 5"})
    t.to_json(path)
    loaded = CostTable.from_json(path)
    assert loaded.batch_sizes == [1, 8] and loaded.steps_per_second == [50.0, 25.0]
    assert loaded.draft_requests == [1, 4] and loaded.draft_seconds == [0.01, 0.02]
    meta = json.loads(path.read_text())["metadata"]
    assert meta["runtime"] == "torch" and meta["method"] == "median of 5"
    assert {"machine", "date", "versions"} <= set(meta)


def test_missing_or_malformed_file_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DSparkError, match=r"nope\.json does not exist.*dspark-trt profile"):
        CostTable.from_json(missing)
    for text in ("{not json", '{"batch_sizes": [1]}', '{"batch_sizes": [1, 2], "steps_per_second": [1, -1]}', "[1, 2]"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(DSparkError, match=r"bad\.json is malformed.*dspark-trt profile"):
            CostTable.from_json(bad)


def test_rows_per_request_count_are_read_for_the_pass_and_interpolated_between_counts():
    # the diagonal says 8 tokens cost 4x one token; one request verifying 8 tokens costs only 1.25x
    t = CostTable([1, 2, 8], [40.0, 30.0, 10.0],
                  by_requests={1: ([1, 8], [40.0, 32.0]), 4: ([4, 8, 16], [20.0, 16.0, 12.0])})
    assert t.sps(8) == 10.0  # no request count: the diagonal
    assert t.sps(8, 1) == 32.0 and t.sps(4, 1) == pytest.approx(36.571, abs=1e-3)
    assert t.sps(16, 4) == 12.0 and t.sps(64, 4) == 12.0  # clamped beyond the row
    # R = 2 lies a third of the way from R = 1 to R = 4: at B = 8, 32 + (16 - 32) / 3
    assert t.sps(8, 2) == pytest.approx(32 - 16 / 3)
    assert t.sps(8, 9) == 16.0 and t.sps(8, 0) == 32.0  # clamped to the profiled counts
    assert np.allclose(t.sps(np.array([1, 8]), 1), [40.0, 32.0])
    # a noisy row is forced non-increasing like the diagonal
    assert CostTable([1], [1.0], by_requests={2: ([2, 4], [5.0, 6.0])}).by_requests[2] == ([2, 4], [5.5, 5.5])


@pytest.mark.parametrize("rows, match", [
    ({0: ([1], [1.0])}, "request counts >= 1"),
    ({2: ([1, 4], [1.0, 1.0])}, "at least 2 tokens"),
    ({2: ([2, 4], [1.0])}, r"by_requests\[2\].batch_sizes and .* equal length"),
    ({2: ([2, 4], [1.0, 0.0])}, r"by_requests\[2\].steps_per_second must be finite and > 0"),
])
def test_bad_rows_are_refused_naming_the_row(rows, match):
    with pytest.raises(ValueError, match=match):
        CostTable([1], [1.0], by_requests=rows)


def test_json_round_trip_keeps_the_rows_and_reads_tables_without_them(tmp_path):
    path = tmp_path / "cost.json"
    CostTable([1, 8], [50.0, 25.0], by_requests={1: ([1, 8], [50.0, 45.0]), 8: ([8], [25.0])}).to_json(path)
    loaded = CostTable.from_json(path)
    assert loaded.by_requests == {1: ([1, 8], [50.0, 45.0]), 8: ([8], [25.0])}
    assert loaded.sps(8, 1) == 45.0
    old = tmp_path / "old.json"  # a profile from before the rows existed
    old.write_text(json.dumps({"batch_sizes": [1, 8], "steps_per_second": [50.0, 25.0]}))
    assert CostTable.from_json(old).sps(8, 1) == 25.0


def test_speculation_speedup_and_the_perfect_drafter_ceiling():
    """One request, a draft step of 5 ms; verifying B tokens takes 1 / SPS(B): 10 ms for 1 or 2, 12.5 for 3, 20 for
    4 ... 40 for 8."""
    sps = [100.0, 100.0, 80.0, 50.0, 40.0, 35.0, 30.0, 25.0]
    table = CostTable([1, 8], [100.0, 25.0], draft_requests=[1], draft_seconds=[0.005],
                      by_requests={1: (list(range(1, 9)), sps)})
    assert table.speculation_speedup(2, 2.0) == pytest.approx(0.020 / 0.015)
    assert table.speculation_speedup(8, 1.5) == pytest.approx(0.015 / 0.045)  # tau 1.5 at gamma 7: a loss
    # a perfect drafter commits all it verifies: v tokens in 5 ms + 1 / SPS(v), against v plain steps of 10 ms
    assert table.perfect_drafter_ceiling(block_size=1) == (2, pytest.approx(0.020 / 0.015))
    assert table.perfect_drafter_ceiling(block_size=3) == (3, pytest.approx(0.030 / 0.0175))  # 4 tokens: 1.6 only
    assert table.perfect_drafter_ceiling(block_size=7) == (7, pytest.approx(0.070 / (0.005 + 1 / 30)))
    free_drafts = CostTable([1, 8], [100.0, 25.0], by_requests={1: (list(range(1, 9)), sps)})  # no draft costs
    assert free_drafts.perfect_drafter_ceiling(block_size=7) == (3, pytest.approx(0.030 / 0.0125))
