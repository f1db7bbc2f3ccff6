"""Closed-loop load sweep: per schedule mode and concurrency C, C client slots each submit their next
prompt as soon as the previous one finishes, for a fixed number of requests (or seconds). The first round's
budgets ramp up to --max-tokens (request_budget), so the clients do not finish in lockstep.

The paper's system claim (DSPARK_SPEC §8, Figure 8) is about this regime: confidence-scheduled
verification should keep aggregate throughput up as concurrency grows while fixed long drafts fall
off a cliff. Per (mode, C) we record aggregate tokens/s, per-user tokens/s (median, p10), time to
first token (median, p90), the average verification length ℓ per request per round, and τ.

Definitions (one place, used by every driver):
  per-user tokens/s  output tokens / (finish − submit) of one request: what its user sees end to end
  aggregate tokens/s all output tokens / (last finish − first submit) of the point
  TTFT               first token − submit
  ℓ per round        drafts sent for verification in one round of one request, averaged over every
                     request's rounds (pooled)
  τ                  tokens committed per round (accepted drafts + bonus), pooled over rounds
Two drivers produce the same request records: the in-process engine and (--served) a real
tritonserver over tritonclient gRPC streaming; `--llama-cpp-server` adds a peer's points from the same loop
over llama.cpp's HTTP server (bench/llama_cpp_server.py).
"""
from __future__ import annotations

import hashlib
import queue
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from dspark_trt.errors import DSparkError

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
DEFAULT_MODES = ("off", "fixed1", "fixed3", "fixed7", "threshold", "dspark", "async")
Progress = Callable[[str], None]
SERVER_START_TIMEOUT_S = 600  # loading the models of a big target on a busy CPU machine takes minutes


# ---- modes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    """One schedule mode of the sweep: a `make_scheduler` mode plus γ for fixed ones ("fixed3"); the
    cost-aware modes also come ungated ("dspark-ungated": draft every step, as in the paper)."""

    name: str
    schedule: str
    gamma: int | None = None
    draft_gate: bool = True

    @property
    def needs_cost_table(self) -> bool:
        return self.schedule in ("dspark", "async")


def parse_modes(text: str) -> list[Mode]:
    """'off,fixed3,dspark' -> modes; DSparkError naming a bad entry."""
    from dspark_trt.spec.scheduler import SCHEDULE_MODES

    modes = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if name.startswith("fixed") and name[5:].isdigit():
            modes.append(Mode(name, "fixed", int(name[5:])))
        elif name in SCHEDULE_MODES and name != "fixed":
            modes.append(Mode(name, name))
        elif name in ("dspark-ungated", "async-ungated"):
            modes.append(Mode(name, name.split("-")[0], draft_gate=False))
        else:
            raise DSparkError(f"unknown mode '{name}' in --modes: use off, fixedN (N drafts verified per round, "
                              "e.g. fixed3), threshold, dspark, async, dspark-ungated or async-ungated")
    if not modes:
        raise DSparkError("--modes is empty")
    if len({m.name for m in modes}) != len(modes):
        raise DSparkError(f"--modes lists a mode twice: {text}")
    return modes


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DSparkError(f"--concurrency must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise DSparkError(f"--concurrency values must be >= 1, got {text!r}")
    return sorted(set(values))


# ---- records and aggregation (pure) ---------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One finished request of the sweep (times in seconds on one perf_counter clock)."""

    prompt: int
    submit: float
    first_token: float
    finish: float
    tokens: int
    verified: list[int] = field(default_factory=list)  # ℓ per round
    accepted: list[int] = field(default_factory=list)  # tokens committed per round (τ of the round)
    output_digest: str = ""  # sha1 of the output token ids (or text, served): same output, same digest
    max_tokens: int | None = None  # its token budget (request_budget): outputs compare per prompt and budget

    @property
    def per_user_tps(self) -> float:
        return self.tokens / (self.finish - self.submit)

    @property
    def ttft(self) -> float:
        return self.first_token - self.submit


def percentile(values: Iterable[float], q: float) -> float | None:
    """q-th percentile with linear interpolation between order statistics (numpy's default); None if empty."""
    values = list(values)
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[RequestRecord]) -> dict:
    """The point's numbers (see the module docstring for definitions)."""
    if not records:
        raise ValueError("no finished requests to summarize")
    tokens = sum(r.tokens for r in records)
    span = max(r.finish for r in records) - min(r.submit for r in records)
    users = [r.per_user_tps for r in records]
    ttfts = [r.ttft for r in records]
    verified = [v for r in records for v in r.verified]
    accepted = [a for r in records for a in r.accepted]
    return {
        "requests": len(records), "tokens": tokens, "seconds": span,
        "aggregate_tokens_per_second": tokens / span,
        "per_user_tokens_per_second_median": percentile(users, 50),
        "per_user_tokens_per_second_p10": percentile(users, 10),
        "ttft_seconds_median": percentile(ttfts, 50), "ttft_seconds_p90": percentile(ttfts, 90),
        "mean_verify_length": float(np.mean(verified)) if verified else 0.0,
        "tau": float(np.mean(accepted)) if accepted else None,
    }


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(per-user TPS, aggregate TPS) points no other point beats on both axes, by per-user TPS ascending."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def digest(values) -> str:
    return hashlib.sha1(repr(list(values)).encode()).hexdigest()[:16]


# ---- the closed loop over the in-process engine ------------------------------------------------------
def request_budget(number: int, concurrency: int, max_tokens: int) -> int:
    """The token budget of a closed loop's request `number` (0-based): the first round's ramp up to max_tokens
    (client i's first request gets (i + 1) / C of it), every later one max_tokens. With equal budgets from the
    start, plain decoding takes max_tokens steps for every request: all finish and resubmit together and their
    prompts prefill in a burst, which ran `off` 4-5% faster at C = 8 on the int4 engines than clients out of step
    (at 3x the median time to first token); speculative modes fall out of step on their own, so lockstep
    favoured `off` over them. Real clients do not arrive together."""
    if number >= concurrency:
        return max_tokens
    return max(1, -(-(number + 1) * max_tokens // concurrency))


def closed_loop_engine(engine, prompts: list[list[int]], params, concurrency: int, num_requests: int | None,
                       duration_s: float | None, digest_of: Callable[[list[int]], str] = digest) -> list[RequestRecord]:
    """Drive `engine` with `concurrency` client slots until num_requests finished or duration_s passed
    (in-flight requests then run to their end). Prompts are taken round robin, budgets by request_budget;
    digest_of(output ids) is each record's output_digest (the served driver's digest the text: pass one that
    decodes to compare them)."""
    finished: list = []
    prompt_of: dict[str, int] = {}  # request id -> prompt index
    records: list[RequestRecord] = []
    submitted = 0
    start = time.perf_counter()

    def more() -> bool:
        if num_requests is not None:
            return submitted < num_requests
        return time.perf_counter() - start < duration_s

    def on_tokens(request, new_ids: list[int], done: bool) -> None:
        if done:
            finished.append(request)

    def submit() -> None:
        nonlocal submitted
        index = submitted % len(prompts)
        budget = request_budget(submitted, concurrency, params.max_tokens)
        request = engine.add_request(prompts[index], replace(params, max_tokens=budget), on_tokens=on_tokens)
        prompt_of[request.request_id] = index
        submitted += 1

    for _ in range(concurrency):
        if more():
            submit()
    while engine.has_work:
        engine.step()
        for request in finished:  # the client sees its answer, then sends its next prompt
            if request.error:
                raise DSparkError(f"request failed during the load sweep: {request.error}")
            stats = request.stats
            records.append(RequestRecord(
                prompt=prompt_of[request.request_id], submit=request.arrival_time, first_token=stats.first_token_time,
                finish=request.finish_time, tokens=len(request.output_ids), verified=list(stats.round_verified),
                accepted=list(stats.accepted_lengths), output_digest=digest_of(request.output_ids),
                max_tokens=request.params.max_tokens))
            if more():
                submit()
        finished.clear()
    return records


def sweep_engine(options, modes: list[Mode], concurrency: list[int], prompts: list[str], max_tokens: int,
                 num_requests: int | None, duration_s: float | None, cost_table: str | None, profile_out: Path,
                 progress: Progress = lambda msg: None,
                 after_concurrency: Callable[[int], None] = lambda c: None) -> tuple[list[dict], str | None]:
    """(points, cost table path used) of the in-process sweep; one runtime shared by every mode.
    Without a cost table the dspark/async modes get one profiled here, written to profile_out.
    after_concurrency(C) runs after every mode's point at C (a peer's point, measured minutes from ours)."""
    from dataclasses import replace

    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.factory import build_engine
    from dspark_trt.engine.prompts import chat_prompt_ids
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.spec.scheduler import make_scheduler

    speculative = [m for m in modes if m.schedule != "off"]
    if speculative and options.draft is None and options.engines is None:
        raise DSparkError(f"modes {', '.join(m.name for m in speculative)} need a drafter (--draft)")
    base, tokenizer = build_engine(replace(options, schedule="fixed" if speculative else "off",
                                           num_slots=max(concurrency)))
    runtime = base.runtime
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    if any(m.needs_cost_table for m in modes):
        cost_table = cost_table or _profile_once(runtime, max(concurrency), profile_out, progress)
    params = SamplingParams(max_tokens=max_tokens, stop_ids=tuple(runtime.eos_token_ids))
    points = []
    # concurrency-major, so every mode of a concurrency is measured minutes apart, not half an hour:
    # drift in what else the machine runs then shifts all modes alike
    for c in concurrency:
        for mode in modes:
            scheduler = None if mode.schedule == "off" else make_scheduler(
                mode.schedule, block_size=runtime.block_size, gamma=mode.gamma, threshold=options.threshold,
                cost_table=cost_table if mode.needs_cost_table else None, has_confidence=runtime.has_confidence_head,
                draft_gate=mode.draft_gate)
            engine = Engine(runtime, scheduler, sts_temperatures=base.sts_temperatures,
                            max_batch_tokens=options.max_batch_tokens, detokenize=base.detokenize)
            engine.generate([ids[0]], SamplingParams(max_tokens=4))  # warm-up outside the clock
            records = closed_loop_engine(engine, ids, params, c, num_requests, duration_s)
            points.append(_point(mode.name, c, records, progress))
        after_concurrency(c)
    order = {mode.name: k for k, mode in enumerate(modes)}
    return sorted(points, key=lambda p: (order[p["mode"]], p["concurrency"])), cost_table


def _profile_once(runtime, max_concurrency: int, out: Path, progress: Progress) -> str:
    """Measure SPS(B) on this runtime up to the largest verification batch the sweep can ask for."""
    from dspark_trt.engine.profiler import profile_runtime

    largest = max_concurrency * (runtime.block_size + 1)
    sizes = sorted({b for b in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < largest} | {largest})
    progress(f"no --cost-table: profiling SPS(B) for B in {sizes} once (dspark/async modes need it)")
    table = profile_runtime(runtime, sizes, context_len=128, repeats=3,
                            progress=lambda msg: progress(f"profile: {msg}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_json(out)
    return str(out)


def _point(name: str, concurrency: int, records: list[RequestRecord], progress: Progress) -> dict:
    point = {"mode": name, "concurrency": concurrency, **summarize(records),
             "per_request": [asdict(r) for r in records]}
    progress(f"{name:>9} C={concurrency:<3} {point['aggregate_tokens_per_second']:7.1f} tok/s aggregate, "
             f"{point['per_user_tokens_per_second_median']:6.1f} tok/s per user (median), "
             f"ℓ {point['mean_verify_length']:.2f}, τ {point['tau'] or float('nan'):.2f}")
    return point


# ---- the closed loop through a real tritonserver ---------------------------------------------------------
def closed_loop_served(grpc_url: str, prompts: list[str], max_tokens: int, concurrency: int,
                       num_requests: int | None, duration_s: float | None, count_tokens: Callable[[str], int],
                       timeout_s: float = 600.0) -> list[RequestRecord]:
    """Closed loop over one gRPC stream to the ensemble (streaming, greedy, perf metrics on).

    The server streams text, not ids: tokens = count_tokens(text) (re-tokenised), rounds are inferred as
    tokens − 1 − accepted drafts (every round commits its accepted drafts plus one; the first token comes
    from prefill), and ℓ per round as verified drafts / rounds (TensorRT-LLM's perf outputs give totals).
    """
    import tritonclient.grpc as grpcclient

    from dspark_trt.serving.package import ENTRY_MODEL

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error, time.perf_counter())))
    open_requests: dict[str, dict] = {}
    records: list[RequestRecord] = []
    submitted = 0
    start = time.perf_counter()

    def more() -> bool:
        return submitted < num_requests if num_requests is not None else time.perf_counter() - start < duration_s

    def submit() -> None:
        nonlocal submitted
        index = submitted % len(prompts)
        request_id = str(submitted)
        budget = request_budget(submitted, concurrency, max_tokens)
        open_requests[request_id] = {"prompt": index, "submit": time.perf_counter(), "first": None, "text": [],
                                     "perf": {}, "max_tokens": budget}
        client.async_stream_infer(ENTRY_MODEL, _ensemble_inputs(grpcclient, prompts[index], budget),
                                  request_id=request_id, enable_empty_final_response=True)
        submitted += 1

    try:
        for _ in range(concurrency):
            if more():
                submit()
        while open_requests:
            result, error, now = events.get(timeout=timeout_s)
            if error is not None:
                raise DSparkError(f"served request failed during the load sweep: {error.message()}")
            response = result.get_response()
            state = open_requests[response.id]
            names = {o.name for o in response.outputs}
            if "text_output" in names:
                text = result.as_numpy("text_output").reshape(-1)[0].decode()
                if text and state["first"] is None:
                    state["first"] = now
                state["text"].append(text)
            for name in ("total_draft_tokens", "total_accepted_draft_tokens"):
                if name in names:
                    state["perf"][name] = int(result.as_numpy(name).item())
            if response.parameters["triton_final_response"].bool_param:
                del open_requests[response.id]
                records.append(_served_record(state, now, count_tokens))
                if more():
                    submit()
    finally:
        client.stop_stream()
        client.close()
    return records


def _served_record(state: dict, finish: float, count_tokens: Callable[[str], int]) -> RequestRecord:
    text = "".join(state["text"])
    tokens = count_tokens(text)
    verified = state["perf"].get("total_draft_tokens", 0)
    accepted = state["perf"].get("total_accepted_draft_tokens", 0)
    rounds = max(1, tokens - 1 - accepted)
    return RequestRecord(prompt=state["prompt"], submit=state["submit"], first_token=state["first"] or finish,
                         finish=finish, tokens=tokens, verified=[verified / rounds] * rounds,
                         accepted=[(tokens - 1) / rounds] * rounds, output_digest=digest(text),
                         max_tokens=state["max_tokens"])


def _ensemble_inputs(module, text: str, max_tokens: int) -> list:
    def tensor(name, value, dtype, np_type):
        t = module.InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np_type))
        return t

    return [tensor("text_input", text.encode(), "BYTES", np.object_),
            tensor("max_tokens", max_tokens, "INT32", np.int32), tensor("stream", True, "BOOL", np.bool_),
            tensor("return_perf_metrics", True, "BOOL", np.bool_)]


def sweep_served(options, modes: list[Mode], concurrency: list[int], prompts: list[str], max_tokens: int,
                 num_requests: int | None, duration_s: float | None, cost_table: str | None, cache_dir: str | None,
                 workdir: Path, profile_out: Path,
                 progress: Progress = lambda msg: None) -> tuple[list[dict], str | None]:
    """The sweep through tritonserver: per mode a repository is packaged from the same engines and served."""
    from dspark_trt.graphs.manifest import load_engine_tokenizer
    from dspark_trt.serving.default_pair import default_engines
    from dspark_trt.serving.package import PackageOptions, package_repository
    from dspark_trt.serving.tritonserver import TritonServer

    ungated = [m.name for m in modes if not m.draft_gate]
    if ungated:
        raise DSparkError(f"modes {', '.join(ungated)} run in-process only: the served orchestrator always gates")
    engines = Path(options.engines) if options.engines else default_engines(options.target, options.draft, cache_dir)
    tokenizer = load_engine_tokenizer(engines)
    if any(m.needs_cost_table for m in modes) and cost_table is None:
        from dspark_trt.engine.factory import EngineOptions, build_engine

        runtime = build_engine(EngineOptions(engines=str(engines), num_slots=max(concurrency)))[0].runtime
        cost_table = _profile_once(runtime, max(concurrency), profile_out, progress)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    points = []
    for mode in modes:
        repo = package_repository(PackageOptions(
            engines=str(engines), out=str(workdir / f"repo-{mode.name}"), schedule=mode.schedule,
            block_size=mode.gamma, cost_table=cost_table if mode.needs_cost_table else None,
            num_slots=max(concurrency)))
        progress(f"{mode.name}: starting tritonserver on {repo}")
        server = TritonServer(repo, workdir=workdir / f"work-{mode.name}")
        try:
            server.start(timeout_s=SERVER_START_TIMEOUT_S)
            closed_loop_served(server.grpc_url, prompts[:1], 4, 1, 1, None, count)  # warm-up
            for c in concurrency:
                records = closed_loop_served(server.grpc_url, prompts, max_tokens, c, num_requests, duration_s, count)
                points.append(_point(mode.name, c, records, progress))
        finally:
            server.stop()
    return points, cost_table


# ---- consistency ----------------------------------------------------------------------------------------
def greedy_mismatches(points: list[dict], reference_mode: str = "off") -> list[str]:
    """Where a mode's output for a prompt (at the same budget) differs from the reference mode's (greedy is
    lossless: none)."""
    def key(r: dict) -> tuple:
        return r["prompt"], r.get("max_tokens")

    reference = {key(r): r["output_digest"] for p in points if p["mode"] == reference_mode for r in p["per_request"]}
    return sorted({f"{p['mode']} C={p['concurrency']} prompt {r['prompt']}" for p in points
                   for r in p["per_request"]
                   if key(r) in reference and r["output_digest"] != reference[key(r)]})


# ---- the benchmark ------------------------------------------------------------------------------------
def bench_load(options, modes: list[Mode], concurrency: list[int], prompts: list[str], max_tokens: int,
               num_requests: int | None, duration_s: float | None, cost_table: str | None, out: Path,
               served: bool = False, cache_dir: str | None = None, llama_cpp_server: bool = False,
               progress: Progress = lambda msg: None) -> dict:
    """Run the sweep, write <out>/load[_served].json and its two PNGs; returns the result dict. With
    llama_cpp_server, llama.cpp's server (bench/llama_cpp_server.py) runs the same closed loop at every C:
    in-process right after our modes at that C, served after the whole sweep (ours needs the cores)."""
    import contextlib
    import json
    import tempfile

    from dspark_trt.bench.common import environment
    from dspark_trt.bench.load_plots import budget_plot, frontier_plot

    if (num_requests is None) == (duration_s is None):
        raise DSparkError("give exactly one of --requests and --seconds")
    if max_tokens < 1 or (num_requests is not None and num_requests < 1) or \
            (duration_s is not None and duration_s <= 0):
        raise DSparkError("--max-tokens, --requests and --seconds must be positive")
    if not prompts:
        raise DSparkError("no prompts to send")
    given_table = cost_table
    out.mkdir(parents=True, exist_ok=True)
    name = "load_served" if served else "load"
    profile_out = out / f"{name}_cost_table.json"
    peers: dict = {}
    with contextlib.ExitStack() as stack:
        run_peer = lambda c: None  # noqa: E731
        if llama_cpp_server:
            run_peer, peers = _llama_cpp_server_peer(options, prompts, max_tokens, num_requests, duration_s,
                                                     out / f"{name}_llama_cpp_server.log", stack, progress)
        if served:  # the repositories and server logs of the sweep go away with it (a failure quotes the log)
            with tempfile.TemporaryDirectory(prefix="dspark-load-served-") as workdir:
                points, cost_table = sweep_served(options, modes, concurrency, prompts, max_tokens, num_requests,
                                                  duration_s, cost_table, cache_dir, Path(workdir), profile_out,
                                                  progress)
            for c in concurrency:
                run_peer(c)
        else:
            points, cost_table = sweep_engine(options, modes, concurrency, prompts, max_tokens, num_requests,
                                              duration_s, cost_table, profile_out, progress, run_peer)
    result = {
        "benchmark": "load", "driver": "tritonserver (tritonclient gRPC streaming)" if served else "in-process engine",
        "target": options.target, "draft": options.draft, "engines": options.engines,
        "modes": [m.name for m in modes], "concurrency": concurrency, "prompts": len(prompts),
        "max_tokens": max_tokens, "requests_per_point": num_requests, "seconds_per_point": duration_s,
        "cost_table": cost_table,
        "cost_table_source": None if cost_table is None else "given" if given_table else "profiled at start",
        "greedy_mismatches_vs_off": greedy_mismatches(points) if any(m.name == "off" for m in modes) else None,
        "points": points, "peers": peers, "environment": environment(),
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{options.target} + {options.draft or 'no drafter'} ({'served' if served else 'in-process'})"
    frontier_plot(points + [p for peer in peers.values() for p in peer.get("points", [])], title,
                  out / f"{name}_frontier.png")
    budget_plot(points, title, out / f"{name}_budget.png")
    return result


def _llama_cpp_server_peer(options, prompts: list[str], max_tokens: int, num_requests: int | None,
                           duration_s: float | None, log_path: Path, stack, progress: Progress):
    """(run_peer(C), peers): llama.cpp's server started (and stopped by `stack`), run_peer appending its point
    at C to peers[PEER_NAME]["points"]; or a no-op and the reason it is skipped."""
    from dspark_trt.bench.llama_cpp_server import PEER_NAME, closed_loop_http, start_peer
    from dspark_trt.bench.peers import default_threads
    from dspark_trt.engine.prompts import chat_prompt_text

    tokenizer = _tokenizer(options)
    texts = [chat_prompt_text(tokenizer, p) for p in prompts]
    n_ctx = max(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts) + max_tokens + 16
    server, reason = start_peer(options.target, n_ctx, default_threads(), log_path)
    if server is None:
        progress(f"{PEER_NAME} skipped: {reason}")
        return (lambda c: None), {PEER_NAME: {"skipped": reason}}
    stack.callback(server.stop)
    peer = {"description": server.describe(), "points": []}
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    # not one of the sweep's prompts: the server would find the whole of it cached for the point's first request
    warm_up = chat_prompt_text(tokenizer, "Hello.")

    def run_peer(c: int) -> None:
        closed_loop_http(server.host, server.port, [warm_up], 4, 1, 1, None, count)  # as every mode's warm-up
        records = closed_loop_http(server.host, server.port, texts, max_tokens, c, num_requests, duration_s, count)
        peer["points"].append(_point(PEER_NAME, c, records, progress))
    return run_peer, {PEER_NAME: peer}


def _tokenizer(options):
    """The tokenizer of the engines (or, without them, of the target) the sweep runs."""
    if options.engines:
        from dspark_trt.graphs.manifest import load_engine_tokenizer

        return load_engine_tokenizer(options.engines)
    from dspark_trt.models.sources import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(options.target))


def summary_table(result: dict) -> str:
    """A plain-text table of the points, one row per (mode, concurrency), then the peers' (no rounds: ℓ, τ '-')."""
    rows = [f"{'mode':>9} {'C':>3} {'agg tok/s':>10} {'user med':>9} {'user p10':>9} {'TTFT med':>9} "
            f"{'TTFT p90':>9} {'ℓ':>5} {'τ':>5}"]
    peers = result.get("peers", {})
    for p in result["points"] + [p for peer in peers.values() for p in peer.get("points", [])]:
        rounds = p["mode"] not in peers
        tau = f"{p['tau']:.2f}" if rounds and p["tau"] is not None else "-"
        verify = f"{p['mean_verify_length']:.2f}" if rounds else "-"
        rows.append(f"{p['mode']:>9} {p['concurrency']:>3} {p['aggregate_tokens_per_second']:>10.1f} "
                    f"{p['per_user_tokens_per_second_median']:>9.1f} {p['per_user_tokens_per_second_p10']:>9.1f} "
                    f"{p['ttft_seconds_median']:>9.3f} {p['ttft_seconds_p90']:>9.3f} {verify:>5} {tau:>5}")
    rows += [f"{name}: skipped ({peer['skipped']})" for name, peer in peers.items() if "skipped" in peer]
    return "\n".join(rows)
