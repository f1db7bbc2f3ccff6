"""NVIDIA AIPerf against a running `dspark-trt serve`: the served ensemble driven unchanged, through Triton's HTTP
`generate_stream` and AIPerf's template endpoint (the request body is TensorRT-LLM's tensor names as JSON, the
streamed `text_output` read back), one AIPerf run per concurrency.

AIPerf lives in its own virtual environment (`make aiperf`: `.venv-aiperf`): it needs numpy 2 and about 1 GB of
dashboards and data tools that the serving stack (nvidia-pytriton pins numpy < 2) must not carry.
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from dspark_trt.errors import DSparkError
from dspark_trt.serving.package import ENTRY_MODEL

# the body of every request: the prompt, AIPerf's output budget, streaming on
PAYLOAD_TEMPLATE = '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens|tojson }}, "stream": true}'
# AIPerf's export name -> ours; each a {"unit", "avg", "p50", "p99", ...} record in profile_export_aiperf.json
METRICS = {
    "time_to_first_token": "ttft_ms", "inter_token_latency": "itl_ms", "request_latency": "request_latency_ms",
    "output_token_throughput": "output_tokens_per_second",
    "output_token_throughput_per_user": "output_tokens_per_second_per_user",
    "request_throughput": "requests_per_second", "output_sequence_length": "output_tokens",
}
DEFAULT_AIPERF = Path(__file__).resolve().parents[2] / ".venv-aiperf" / "bin" / "aiperf"


def find_aiperf(path: str | None) -> Path:
    """The aiperf executable: `path`, else `make aiperf`'s, else one on PATH."""
    found = Path(path) if path else DEFAULT_AIPERF if DEFAULT_AIPERF.is_file() else shutil.which("aiperf")
    if not found or not Path(found).is_file():
        raise DSparkError("aiperf not found: run `make aiperf` (it installs aiperf into .venv-aiperf) or pass "
                          "--aiperf PATH")
    return Path(found)


def aiperf_command(aiperf: Path, url: str, tokenizer: str, inputs: Path, concurrency: int, requests: int,
                   max_tokens: int, artifacts: Path) -> list[str]:
    """One AIPerf profile of the served ensemble at `concurrency`, on our prompts: `inputs` holds prompts.jsonl
    (single-turn JSONL) and template.json (PAYLOAD_TEMPLATE: AIPerf splits an inline template at its commas).
    AIPerf runs beside the server on the same cores, so it runs lean: one worker (its requests are asyncio
    streams; more workers only add processes), and no server-metrics scraping, which looks for /metrics on the
    HTTP port (Triton serves it on the metrics port) and, starved of CPU, missed its heartbeats and was reaped."""
    return [str(aiperf), "profile", "--model", ENTRY_MODEL, "--url", url, "--endpoint-type", "template",
            "--custom-endpoint", f"/v2/models/{ENTRY_MODEL}/generate_stream", "--streaming",
            "--extra-inputs", f"payload_template:{inputs / 'template.json'}", "--extra-inputs", "response_field:text_output",
            "--tokenizer", tokenizer, "--input-file", str(inputs / "prompts.jsonl"), "--custom-dataset-type", "single_turn",
            "--output-tokens-mean", str(max_tokens), "--output-tokens-stddev", "0",
            "--concurrency", str(concurrency), "--request-count", str(requests),
            "--warmup-request-count", str(concurrency), "--random-seed", "0", "--no-gpu-telemetry",
            "--no-server-metrics", "--workers-max", "1",
            "--ui-type", "none", "--artifact-dir", str(artifacts)]


def summarize(export: dict) -> dict:
    """Our row of one AIPerf run: each metric's avg, p50 and p99 (throughputs: avg), and the error count."""
    row = {}
    for theirs, ours in METRICS.items():
        record = export.get(theirs)
        if record is None:
            raise DSparkError(f"AIPerf's export has no '{theirs}' (a version whose export we do not read?)")
        row[ours] = {k: record[k] for k in ("avg", "p50", "p99") if record.get(k) is not None}
    row["requests"] = int(export["request_count"]["avg"])
    errors = export.get("error_summary") or []
    row["errors"] = sum(int(e.get("count", 1)) for e in errors)
    return row


def bench_aiperf(url: str, tokenizer: str, prompts: list[str], concurrency: list[int], requests: int,
                 max_tokens: int, out: Path, aiperf: str | None = None,
                 progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Run AIPerf at each concurrency against the server at `url`; its artifacts go under `out`."""
    from dspark_trt.bench.common import environment

    binary = find_aiperf(aiperf)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    (out / "template.json").write_text(PAYLOAD_TEMPLATE + "\n")
    rows = []
    for c in concurrency:
        artifacts = out / f"concurrency-{c}"
        command = aiperf_command(binary, url, tokenizer, out, c, requests, max_tokens, artifacts)
        progress(f"concurrency {c}: {requests} requests")
        before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
        export = artifacts / "profile_export_aiperf.json"
        if result.returncode != 0 or not export.is_file():
            raise DSparkError(f"aiperf failed at concurrency {c} (exit {result.returncode}): "
                              f"{(result.stderr or result.stdout)[-2000:]}")
        # AIPerf's own processes share the cores with the server: what they took is part of the reading
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        rows.append({"concurrency": c, **summarize(json.loads(export.read_text())), "aiperf_wall_seconds": wall,
                     "aiperf_cpu_seconds": cpu})
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip()
    return {"benchmark": "aiperf", "url": url, "aiperf": version or str(binary), "prompts": len(prompts),
            "max_tokens": max_tokens, "requests_per_point": requests, "payload_template": PAYLOAD_TEMPLATE,
            "rows": rows, "environment": environment()}


def aiperf_table(result: dict) -> str:
    """The markdown table of docs/benchmarks.md: TTFT, inter-token latency and throughput per concurrency."""
    lines = ["| concurrency | TTFT ms avg / p50 / p99 | ITL ms avg / p50 / p99 | output tok/s | tok/s per user "
             "| requests/s | errors | AIPerf's CPU (cores) |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ttft, itl = row["ttft_ms"], row["itl_ms"]
        lines.append(f"| {row['concurrency']} | {ttft['avg']:.0f} / {ttft['p50']:.0f} / {ttft['p99']:.0f} "
                     f"| {itl['avg']:.1f} / {itl['p50']:.1f} / {itl['p99']:.1f} "
                     f"| {row['output_tokens_per_second']['avg']:.1f} "
                     f"| {row['output_tokens_per_second_per_user']['avg']:.1f} "
                     f"| {row['requests_per_second']['avg']:.2f} | {row['errors']} "
                     f"| {row['aiperf_cpu_seconds'] / row['aiperf_wall_seconds']:.2f} |")
    return "\n".join(lines)
