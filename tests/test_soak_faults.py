"""scripts/soak.py's fault bookkeeping on synthetic timelines: when the kills land, which failures a fault
owns (a request in flight between a kill and ready again) and which are bugs, how errors are grouped, and
which RSS levels the report gives. The real run is docs/benchmarks.md's "Soak with faults"."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import soak  # noqa: E402 - needs the scripts directory on the path

FAULTS = [{"killed_s": 150.0, "ready_s": 190.0}, {"killed_s": 450.0, "ready_s": 480.0}]


def failure(start_s: float, end_s: float, error: str = "Stream removed") -> dict:
    return {"start_s": start_s, "end_s": end_s, "outcome": "failed", "error": error}


def test_kills_start_half_a_period_in_and_stay_inside_the_run():
    assert soak.kill_times(30, 5) == [150, 450, 750, 1050, 1350, 1650]
    assert soak.kill_times(3, 1) == [30, 90, 150]
    assert soak.kill_times(2, 5) == []


def test_a_failure_belongs_to_the_fault_whose_window_its_request_was_in_flight_in():
    failures = [failure(140, 151),  # in flight at the kill
                failure(160, 160.1),  # refused while the server restarts
                failure(189.9, 190.2),  # sent just before ready, ended after it
                failure(100, 149.9),  # ended before the kill
                failure(190.1, 191),  # sent after ready again: the server failed it
                failure(440, 470),  # the second fault
                failure(600, 601)]
    soak.classify(failures, FAULTS)
    assert [f["fault"] for f in failures] == [0, 0, 0, None, None, 1, None]


def test_error_shapes_count_one_cause_once():
    failures = [failure(0, 1, "failed to connect to 127.0.0.1:40123"),
                failure(0, 1, "failed to connect to 127.0.0.1:40777"), failure(0, 1, "Stream removed")]
    assert soak.error_shapes(failures) == {"failed to connect to N.N.N.N:N": 2, "Stream removed": 1}


def test_rss_levels_before_the_first_fault_after_each_recovery_and_at_the_end():
    samples = [{"t_s": t, "rss_total_mb": mb} for t, mb in
               [(100, 7000), (145, 7100), (160, None), (195, 3000), (250, 6900), (440, 7050), (455, None),
                (500, 3100), (545, 6800), (700, 7020)]]
    levels = soak.rss_levels(samples, FAULTS)
    assert levels["rss_total_mb_before_first_fault"] == 7100
    assert levels["rss_total_mb_at_end"] == 7020
    assert levels["faults"] == [
        {"rss_total_mb_before_kill": 7100, "rss_total_mb_ready_plus_settle": 6900, "rss_total_mb_before_next": 7050},
        {"rss_total_mb_before_kill": 7050, "rss_total_mb_ready_plus_settle": 6800, "rss_total_mb_before_next": 7020}]
