"""`bench aiperf`: NVIDIA AIPerf drives the served ensemble unchanged (HTTP generate_stream, TensorRT-LLM's tensor
names), and its export becomes our table. The export read here is a real one (AIPerf 0.13.0 against `dspark-trt
serve --draft default`, trimmed to the fields we read); the end-to-end run needs AIPerf (`make aiperf`)."""
import json
from pathlib import Path

import jinja2
import pytest

from dspark_trt.bench.aiperf import (DEFAULT_AIPERF, METRICS, PAYLOAD_TEMPLATE, aiperf_command, aiperf_table,
                                     find_aiperf, summarize)
from dspark_trt.errors import DSparkError
from dspark_trt.serving.ensemble import STEPS

from test_triton_serving import engines, pair  # noqa: F401  (the tiny pair's engine directory)

EXPORT = Path(__file__).parent / "data" / "aiperf_export.json"


def test_the_template_renders_a_request_in_the_ensembles_own_field_names():
    """A prompt with quotes, commas and a newline becomes valid JSON whose keys the ensemble reads."""
    prompt = 'Say "hi", then\nlist: a, b, c'
    body = json.loads(jinja2.Template(PAYLOAD_TEMPLATE).render(text=prompt, max_tokens=7))
    assert body == {"text_input": prompt, "max_tokens": 7, "stream": True}
    ensemble_inputs = {tensor for _, inputs, _ in STEPS for tensor in inputs.values() if not tensor.startswith("_")}
    assert set(body) <= ensemble_inputs


def test_the_command_streams_from_generate_stream_with_the_template_in_a_file(tmp_path):
    command = aiperf_command(Path("aiperf"), "http://127.0.0.1:8000", "tok", tmp_path, 4, 9, 64, tmp_path / "a")
    flag = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
    assert flag["--custom-endpoint"] == "/v2/models/ensemble/generate_stream" and "--streaming" in command
    assert flag["--concurrency"] == "4" and flag["--request-count"] == "9" and flag["--output-tokens-mean"] == "64"
    templates = [a for a in command if a.startswith("payload_template:")]
    assert templates == [f"payload_template:{tmp_path / 'template.json'}"]  # inline, AIPerf splits it at commas
    assert "response_field:text_output" in command
    assert "--no-server-metrics" in command and flag["--workers-max"] == "1"


def test_a_real_export_becomes_one_row_of_the_table():
    export = json.loads(EXPORT.read_text())
    row = summarize(export)
    assert set(row) == set(METRICS.values()) | {"requests", "errors"}
    assert row["ttft_ms"]["avg"] == export["time_to_first_token"]["avg"]
    assert row["itl_ms"]["p99"] == export["inter_token_latency"]["p99"]
    assert row["requests"] == export["request_count"]["avg"] and row["errors"] == 0
    with_errors = dict(export, error_summary=[{"error_details": {"message": "x"}, "count": 3}])
    assert summarize(with_errors)["errors"] == 3
    table = aiperf_table({"rows": [{"concurrency": 1, **row, "aiperf_wall_seconds": 4.0, "aiperf_cpu_seconds": 3.0}]})
    assert table.splitlines()[2].startswith(f"| 1 | {row['ttft_ms']['avg']:.0f} / ")
    assert table.splitlines()[2].endswith("| 0 | 0.75 |")
    with pytest.raises(DSparkError, match="no 'inter_token_latency'"):
        summarize({k: v for k, v in export.items() if k != "inter_token_latency"})


def test_missing_aiperf_is_a_clear_error(tmp_path):
    with pytest.raises(DSparkError, match="make aiperf"):
        find_aiperf(str(tmp_path / "aiperf"))


@pytest.mark.skipif(not DEFAULT_AIPERF.is_file(), reason="AIPerf is not installed (`make aiperf`)")
def test_aiperf_drives_the_served_ensemble(engines, tmp_path):  # noqa: F811 (test_triton_serving's engines)
    from conftest import packaged_server

    from dspark_trt.bench.aiperf import bench_aiperf

    with packaged_server(engines, tmp_path, schedule="fixed", num_slots=2) as server:
        result = bench_aiperf(f"http://{server.http_url}", str(engines / "tokenizer"), ["w5 w6 w7", "w8 w9"],
                              [1, 2], requests=4, max_tokens=6, out=tmp_path / "aiperf")
    assert [row["concurrency"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["errors"] == 0 and row["requests"] == 4 and row["ttft_ms"]["avg"] > 0
        assert 0 < row["aiperf_cpu_seconds"] and 0 < row["aiperf_wall_seconds"]
