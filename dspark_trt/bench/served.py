"""Served vs in-process throughput on the same engines, schedule, cost table and calibration, side by side:
at each concurrency the in-process engine's closed loop runs, then the same closed loop through a real
tritonserver (tritonclient gRPC streams to the ensemble), while the server's resident memory (tritonserver
plus every Python stub) is sampled; `rounds` such pairs alternate, so drift in the machine's speed (two
shared cores move by ±10% within minutes) falls on both sides alike. Greedy decoding is lossless and the engines are batch-invariant, so
every served text must equal the in-process engine's decoded output for the same prompt."""
from __future__ import annotations

import os
import threading

from dspark_trt.bench.common import environment
from dspark_trt.bench.load import closed_loop_engine, closed_loop_served, digest, summarize
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.graphs.manifest import load_engine_tokenizer
from dspark_trt.serving.default_pair import default_options, default_repository
from dspark_trt.serving.processes import cpu_seconds, tree_cpu_seconds, tree_rss_mb
from dspark_trt.serving.tritonserver import TritonServer

RSS_EVERY_S = 1.0
WARMUP_TOKENS = 16  # per request of the untimed warm-up before each concurrency


class RssSampler:
    """Samples the resident memory of a process tree every RSS_EVERY_S seconds while in its `with` block."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(tree_rss_mb(self.pid))
            if self._stop.wait(RSS_EVERY_S):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


class CpuMeter:
    """CPU seconds used in its `with` block by this process (the in-process engine, or the served side's client)
    and, given a server pid, by tritonserver with all its stubs: on 2 shared cores the client's and the server's
    CPU come out of the same budget, so each side's CPU per token says where served throughput goes."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.own_s = self.server_s = 0.0

    def __enter__(self) -> CpuMeter:
        self._own0 = cpu_seconds(os.getpid())
        self._server0 = tree_cpu_seconds(self.server_pid) if self.server_pid else 0.0
        return self

    def __exit__(self, *exc_info) -> None:
        self.own_s = cpu_seconds(os.getpid()) - self._own0
        self.server_s = tree_cpu_seconds(self.server_pid) - self._server0 if self.server_pid else 0.0


def bench_served(target: str, draft: str | None, prompts: list[str], max_tokens: int, concurrency: list[int],
                 seconds: float, rounds: int, cache_dir: str | None, progress=lambda msg: None) -> dict:
    """One point per concurrency: in-process and served aggregate tokens/s, their ratio, and the server's RSS."""
    options = default_options(target, draft, cache_dir)  # what `serve` packages; the in-process engine gets the same
    repo = default_repository(options)
    engines = options.engines
    engine, _ = build_engine(EngineOptions(engines=engines, schedule=options.schedule,
                                           cost_table=options.cost_table, calibration=options.calibration,
                                           num_slots=options.num_slots, max_queue_size=options.max_queue_size))
    tokenizer = load_engine_tokenizer(engines)
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, stop_ids=tuple(engine.runtime.eos_token_ids))
    text_digest = lambda out: digest(tokenizer.decode(out, skip_special_tokens=True))  # noqa: E731
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    points = []
    with TritonServer(repo) as server:  # starts the server and waits until it is ready
        idle_rss = tree_rss_mb(server.pid)
        for c in concurrency:
            # warm-up at this concurrency, untimed, both sides: a server's first batch of a new size grows its
            # stubs' shared memory and ONNX Runtime's buffers once (a first C = 16 round ran at 0.64x, later 0.9x)
            closed_loop_served(server.grpc_url, prompts, WARMUP_TOKENS, c, c, None, count)
            closed_loop_engine(engine, ids, SamplingParams(max_tokens=WARMUP_TOKENS), c, c, None)
            local, remote, rss, cpu = [], [], [], {"in_process": 0.0, "server": 0.0, "client": 0.0}
            for _ in range(rounds):
                with CpuMeter() as meter:
                    local.append(closed_loop_engine(engine, ids, params, c, None, seconds, text_digest))
                cpu["in_process"] += meter.own_s
                with RssSampler(server.pid) as sampler, CpuMeter(server.pid) as meter:
                    remote.append(closed_loop_served(server.grpc_url, prompts, max_tokens, c, None, seconds, count))
                cpu["server"] += meter.server_s
                cpu["client"] += meter.own_s
                rss += sampler.samples
            point = {"concurrency": c, "in_process": combined(local), "served": combined(remote),
                     "server_rss_mb_max": max(rss), "server_rss_mb_mean": sum(rss) / len(rss),
                     "mismatched_prompts": mismatched_prompts(sum(local, []), sum(remote, []))}
            point["ratio"] = (point["served"]["aggregate_tokens_per_second"]
                              / point["in_process"]["aggregate_tokens_per_second"])
            point["cpu_ms_per_token"] = {
                "in_process": 1e3 * cpu["in_process"] / point["in_process"]["tokens"],
                "server": 1e3 * cpu["server"] / point["served"]["tokens"],
                "client": 1e3 * cpu["client"] / point["served"]["tokens"]}
            progress(f"C={c}: in-process {point['in_process']['aggregate_tokens_per_second']:.1f} tok/s, served "
                     f"{point['served']['aggregate_tokens_per_second']:.1f} tok/s ({point['ratio']:.2f}x; by round "
                     + ", ".join(f"{b['aggregate_tokens_per_second'] / a['aggregate_tokens_per_second']:.2f}"
                                 for a, b in zip(point["in_process"]["rounds"], point["served"]["rounds"]))
                     + f"), server RSS max {point['server_rss_mb_max']:.0f} MB; CPU ms per token: in-process "
                     + "{in_process:.1f}, server {server:.1f}, client {client:.1f}".format(**point["cpu_ms_per_token"]))
            points.append(point)
    return {"benchmark": "served", "target": target, "draft": draft, "engines": str(engines),
            "schedule": options.schedule, "cost_table": options.cost_table, "calibration": options.calibration,
            "num_slots": options.num_slots, "prompts": len(prompts), "max_tokens": max_tokens, "seconds": seconds,
            "rounds": rounds,
            "server_rss_mb_idle": idle_rss, "points": points,
            "transport": "tritonclient gRPC streaming to the ensemble", "environment": environment()}


def combined(rounds: list[list]) -> dict:
    """One side of a point over its rounds: tokens over the rounds' summed seconds, and each round's summary."""
    summaries = [summarize(records) for records in rounds]
    tokens, seconds = sum(s["tokens"] for s in summaries), sum(s["seconds"] for s in summaries)
    return {"requests": sum(s["requests"] for s in summaries), "tokens": tokens, "seconds": seconds,
            "aggregate_tokens_per_second": tokens / seconds, "rounds": summaries}


def mismatched_prompts(local: list, remote: list) -> list[int]:
    """Prompts whose served output differs from the in-process one at the same budget (each side's digest of the
    decoded text)."""
    local_digests: dict[tuple, set[str]] = {}
    for record in local:
        local_digests.setdefault((record.prompt, record.max_tokens), set()).add(record.output_digest)
    served_differs = {r.prompt for r in remote if (r.prompt, r.max_tokens) in local_digests
                      and r.output_digest not in local_digests[r.prompt, r.max_tokens]}
    return sorted(served_differs | {p for (p, _), digests in local_digests.items() if len(digests) > 1})


def served_table(result: dict) -> str:
    """The markdown table of docs/benchmarks.md."""
    lines = ["| C | in-process tok/s | served tok/s | served / in-process | server RSS (max, MB) "
             "| CPU ms per token: in-process / server / client |",
             "|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['concurrency']} | {p['in_process']['aggregate_tokens_per_second']:.1f} | "
                     f"{p['served']['aggregate_tokens_per_second']:.1f} | {p['ratio']:.2f} | "
                     f"{p['server_rss_mb_max']:,.0f} | "
                     + "{in_process:.1f} / {server:.1f} / {client:.1f} |".format(**p["cpu_ms_per_token"]))
    return "\n".join(lines)
