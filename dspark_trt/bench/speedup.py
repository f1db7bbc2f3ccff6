"""Batch-1 greedy speedup of DSpark over AR on the same runtime: per prompt, AR and DSpark runs are
interleaved in one process, outputs are checked token-identical, τ is reported, over all prompts and per
domain (math, code, chat: the domain of the prompts file a prompt comes from).

Peers run on the same prompt ids in the same loop, greedy, with the same token budget and stop tokens, on the
project's thread count: transformers `generate` and its prompt-lookup mode, onnxruntime-genai's int4 model of
the target (bench/peers.py), llama.cpp on the target's GGUF, plain and with its own prompt lookup
(bench/llama_cpp_peer.py); a peer that cannot run here is listed as skipped with the reason. Every row counts
its new tokens after the prompt, the stop token included, as our engine does, over the whole request's seconds
(prefill included), and says whether its tokens equal our AR's; a speculative peer also says whether they
equal its own plain decoding's (prompt lookup is lossless in exact arithmetic; llama.cpp's batched verification
computes other logits than its one-token steps, so a near-tie can flip)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dspark_trt.bench.common import environment, timed
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.models.sources import resolve_model
from dspark_trt.spec.cost_table import CostTable

PROMPT_LOOKUP_TOKENS = 10  # transformers' usual prompt_lookup_num_tokens; llama.cpp's gets the same
AR, DSPARK = "ours AR", "ours DSpark"
# the eval sets' domains (shared/data/eval/README.md); a prompts file not listed is its own domain
DOMAINS = {"gsm8k": "math", "math500": "math", "humaneval": "code", "mbpp": "code", "mt-bench": "chat"}


def prompt_domain(path: str | Path) -> str:
    """The domain of the prompts in this file, from its name."""
    stem = Path(path).stem
    return DOMAINS.get(stem, stem)


@dataclass
class PeerRunner:
    """A peer as bench speedup runs it: run(prompt ids) -> new token ids, what ran, and the row whose tokens a
    speculative peer must reproduce (its own plain decoding)."""

    run: Callable[[list[int]], list[int]]
    description: dict
    what_ran: str
    plain: str | None = None


def bench_speedup(target: str, draft: str, prompts: list[str], max_tokens: int, schedule: str = "fixed",
                  progress=lambda msg: None, peers: bool = True, engines: str | None = None,
                  cost_table: str | None = None, domains: list[str] | None = None) -> dict:
    """engines: a build-engines directory, so both decoders run on ONNX Runtime (else the torch runtime).
    domains: the domain of each prompt (default: all in one domain, 'all')."""
    from dspark_trt.bench.peers import pin_threads

    domains = domains or ["all"] * len(prompts)
    if len(domains) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(domains)} domains")
    threads = pin_threads()
    options = EngineOptions(target=target, draft=draft, engines=engines, schedule=schedule, cost_table=cost_table,
                            num_slots=1)
    ar, tokenizer = build_engine(EngineOptions(target=target, engines=engines, schedule="off", num_slots=1))
    spec, _ = build_engine(options)
    stop = tuple(ar.runtime.eos_token_ids)
    params = SamplingParams(max_tokens=max_tokens, stop_ids=stop)
    prompt_ids = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    n_ctx = max(len(ids) for ids in prompt_ids) + max_tokens + 8
    runners, skipped = _peer_runners(target, stop, max_tokens, n_ctx, threads, progress) if peers else ({}, {})
    warm = chat_prompt_ids(tokenizer, "Hello")
    ar.generate([warm], SamplingParams(max_tokens=4))
    spec.generate([warm], SamplingParams(max_tokens=4))
    for runner in runners.values():
        runner.run(warm[:8])
    rows = []
    for i, (ids, domain) in enumerate(zip(prompt_ids, domains)):
        a, a_s = timed(lambda: ar.generate([ids], params)[0])
        s, s_s = timed(lambda: spec.generate([ids], params)[0])
        runs = {AR: {"tokens": len(a.output_ids), "seconds": a_s},
                DSPARK: {"tokens": len(s.output_ids), "seconds": s_s}}
        outputs = {AR: a.output_ids}
        for name, runner in runners.items():
            outputs[name], seconds = timed(lambda: runner.run(ids))
            runs[name] = {"tokens": len(outputs[name]), "seconds": seconds,
                          "token_identical_to_ar": outputs[name] == a.output_ids}
            if runner.plain is not None:
                runs[name]["token_identical_to_plain"] = outputs[name] == outputs[runner.plain]
        rows.append({"prompt": i, "domain": domain, "tokens": len(a.output_ids),
                     "identical": a.output_ids == s.output_ids, "ar_tokens_per_second": len(a.output_ids) / a_s,
                     "dspark_tokens_per_second": len(s.output_ids) / s_s,
                     "mean_accepted_length": s.stats.mean_accepted_length,
                     "accepted_tokens": sum(s.stats.accepted_lengths), "steps": len(s.stats.accepted_lengths),
                     # how often it drafted (a gate may skip the pass) and what verification made of the drafts
                     "drafted_steps": s.stats.draft_tokens_proposed // spec.runtime.block_size,
                     "drafts_verified": s.stats.draft_tokens_verified,
                     "drafts_accepted": s.stats.draft_tokens_accepted,
                     "runs": runs})
        progress(f"prompt {i + 1}/{len(prompts)} ({domain}): AR {rows[-1]['ar_tokens_per_second']:.1f} tok/s, "
                 f"DSpark {rows[-1]['dspark_tokens_per_second']:.1f} tok/s, tau {s.stats.mean_accepted_length:.2f}"
                 + "".join(f", {name} {run['tokens'] / run['seconds']:.1f}" for name, run in runs.items()
                           if name not in (AR, DSPARK)))
    overall = summarize(rows)
    for row in overall["peers"]:
        row.update(description=runners[row["name"]].description, what_ran=runners[row["name"]].what_ran)
    overall["peers"] += [{"name": name, "status": "skipped", "reason": reason} for name, reason in skipped.items()]
    return {"benchmark": "speedup", "target": target, "draft": str(draft), "schedule": schedule,
            "runtime": spec.runtime.name, "engines": engines, "cost_table": cost_table, "max_tokens": max_tokens,
            "threads": threads, **overall,
            "ceiling": None if cost_table is None else ceiling(CostTable.from_json(cost_table),
                                                               spec.runtime.block_size, schedule,
                                                               overall["mean_accepted_length"]),
            "per_domain": {d: summarize([r for r in rows if r["domain"] == d]) for d in dict.fromkeys(domains)},
            "per_prompt": rows, "environment": environment()}


def ceiling(table: CostTable, block_size: int, schedule: str, tau: float | None) -> dict:
    """How far this run is from the limit, on the measured cost table (batch 1): the speedup of a drafter whose
    every draft is accepted, and for the fixed schedule what the table predicts at the measured τ (so a gap
    between the prediction and the run is the engine's, not the drafter's)."""
    verified, speedup = table.perfect_drafter_ceiling(block_size)
    result = {"perfect_drafter_speedup": speedup, "perfect_drafter_verified_tokens": verified,
              "plain_step_ms": 1e3 / float(table.sps(1, 1)), "draft_step_ms": 1e3 * table.draft_step_seconds(1),
              "verify_ms_by_tokens": {v: 1e3 / float(table.sps(v, 1)) for v in range(1, block_size + 2)}}
    if schedule == "fixed" and tau is not None:
        result["predicted_speedup_at_measured_tau"] = table.speculation_speedup(block_size + 1, tau)
    return result


def summarize(rows: list[dict]) -> dict:
    """AR, DSpark and every peer that ran over these per-prompt rows: tokens/s as all their new tokens over all
    their seconds, DSpark's speedup and τ (accepted tokens over verify steps), the peers' ratio to AR and
    whether their tokens were identical on every prompt."""
    totals: dict[str, dict] = {}
    for row in rows:
        for name, run in row["runs"].items():
            total = totals.setdefault(name, {"tokens": 0, "seconds": 0.0, "identical": True})
            total["tokens"] += run["tokens"]
            total["seconds"] += run["seconds"]
            total["identical"] &= run.get("token_identical_to_ar", True)
            if "token_identical_to_plain" in run:
                total["plain"] = total.get("plain", True) and run["token_identical_to_plain"]
    tps = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
    steps = sum(r["steps"] for r in rows)
    peers = []
    for name, total in totals.items():
        if name in (AR, DSPARK):
            continue
        peer = {"name": name, "status": "ran", "tokens_per_second": tps[name], "ratio_to_ar": tps[name] / tps[AR],
                "token_identical_to_ar": total["identical"]}
        if "plain" in total:
            peer["token_identical_to_plain"] = total["plain"]
        peers.append(peer)
    return {"prompts": len(rows), "ar_tokens_per_second": tps[AR], "dspark_tokens_per_second": tps[DSPARK],
            "speedup": tps[DSPARK] / tps[AR],
            "mean_accepted_length": sum(r["accepted_tokens"] for r in rows) / steps if steps else None,
            "all_token_identical": all(r["identical"] for r in rows), "peers": peers}


def _peer_runners(target: str, stop: tuple[int, ...], max_tokens: int, n_ctx: int, threads: int,
                  progress) -> tuple[dict[str, PeerRunner], dict[str, str]]:
    """The peers that run here (name -> runner, each plain decoder before its speculative mode) and the ones
    that cannot (name -> the reason)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from dspark_trt.bench.llama_cpp_peer import llama_cpp_peer, peer_name
    from dspark_trt.bench.peers import GENAI_NAME, genai_peer

    source = resolve_model(target)
    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                              dtype=torch.float32).eval()

    def transformers_runner(plain: str | None = None, **extra) -> PeerRunner:
        def run(ids: list[int]) -> list[int]:
            with torch.inference_mode():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                  eos_token_id=list(stop) or None, pad_token_id=stop[0] if stop else None, **extra)
            return out[0, len(ids):].tolist()
        weights = "float32 weights dequantized from the GGUF" if source.kind == "gguf" else "float32 weights"
        lookup = extra.get("prompt_lookup_num_tokens")
        description = {"transformers": transformers.__version__, "torch": torch.__version__, "device": "cpu",
                       "torch_threads": torch.get_num_threads(), "weights": weights,
                       "prompt_lookup_num_tokens": lookup}
        what_ran = (f"transformers {transformers.__version__} generate on torch {torch.__version__} (CPU), "
                    f"{weights}, {torch.get_num_threads()} threads"
                    + (f", prompt lookup {lookup} tokens" if lookup else ""))
        return PeerRunner(run, description, what_ran, plain)

    plain = "transformers generate"
    runners = {plain: transformers_runner(),
               f"transformers prompt lookup ({PROMPT_LOOKUP_TOKENS})":
               transformers_runner(plain, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)}
    skipped = {}
    genai, reason = genai_peer(source, hf, None, None, threads, progress)
    if genai is None:
        skipped[GENAI_NAME] = reason
    else:
        runners[GENAI_NAME] = PeerRunner(lambda ids: genai.generate(ids, max_tokens, stop).output_ids,
                                         genai.describe(), genai.summary())
    for lookup in (None, PROMPT_LOOKUP_TOKENS):
        llama, reason = llama_cpp_peer(source, n_ctx, threads, lookup)
        if llama is None:
            skipped[peer_name(lookup)] = reason
        else:
            runners[peer_name(lookup)] = PeerRunner(
                lambda ids, llama=llama: llama.generate(ids, max_tokens, stop).output_ids, llama.describe(),
                llama.summary(), None if lookup is None else peer_name())
    for name, reason in skipped.items():
        progress(f"{name} row skipped: {reason}")
    return runners, skipped


def speedup_table(result: dict) -> str:
    """The printed summary: AR, DSpark and every peer side by side over all prompts, what each peer ran, and
    tokens/s (ratio to AR) per domain."""
    rows = [f"{'decoder':<36} {'tok/s':>8} {'vs AR':>6}  token-identical to AR",
            f"{AR:<36} {result['ar_tokens_per_second']:>8.1f} {1.0:>6.2f}  -",
            f"{DSPARK + ' (' + result['schedule'] + ')':<36} {result['dspark_tokens_per_second']:>8.1f} "
            f"{result['speedup']:>6.2f}  {result['all_token_identical']}  (tau {result['mean_accepted_length']:.2f})"]
    for peer in result["peers"]:
        if peer["status"] != "ran":
            rows.append(f"{peer['name']:<36} skipped: {peer['reason']}")
            continue
        plain = ("" if "token_identical_to_plain" not in peer
                 else f"  (identical to its plain decoding: {peer['token_identical_to_plain']})")
        rows.append(f"{peer['name']:<36} {peer['tokens_per_second']:>8.1f} {peer['ratio_to_ar']:>6.2f}  "
                    f"{peer['token_identical_to_ar']}{plain}")
    rows += [f"  {peer['name']}: {peer['what_ran']}" for peer in result["peers"] if "what_ran" in peer]
    limit = result.get("ceiling")
    if limit is None:
        rows.append("ceiling: not computed (give --cost-table, a `dspark-trt profile` of these engines)")
    else:
        rows.append(f"ceiling on the cost table: a drafter whose every draft is accepted "
                    f"{limit['perfect_drafter_speedup']:.2f}x (verifying {limit['perfect_drafter_verified_tokens']} "
                    f"tokens; plain step {limit['plain_step_ms']:.1f} ms, draft step {limit['draft_step_ms']:.1f} ms)"
                    + ("" if "predicted_speedup_at_measured_tau" not in limit else
                       f"; predicted at the measured tau {limit['predicted_speedup_at_measured_tau']:.2f}x"))
    per_domain = result.get("per_domain", {})
    if per_domain:
        columns = {"all": result, **per_domain}
        rows.append(f"\n{'tok/s (vs AR) by domain':<36}" + "".join(
            "{:>16}".format(f"{name} ({column['prompts']})") for name, column in columns.items()))

        def cell(tps: float, ratio: float) -> str:
            return "{:>16}".format(f"{tps:.1f} ({ratio:.2f}x)")
        rows.append(f"{AR:<36}" + "".join(cell(c["ar_tokens_per_second"], 1.0) for c in columns.values()))
        rows.append(f"{DSPARK:<36}" + "".join(cell(c["dspark_tokens_per_second"], c["speedup"])
                                             for c in columns.values()))
        rows.append(f"{'  tau':<36}" + "".join("{:>16.2f}".format(c["mean_accepted_length"] or float("nan"))
                                               for c in columns.values()))
        for peer in result["peers"]:
            if peer["status"] == "ran":
                rows.append(f"{peer['name']:<36}" + "".join(
                    cell(p["tokens_per_second"], p["ratio_to_ar"]) for c in columns.values()
                    for p in c["peers"] if p["name"] == peer["name"]))
    return "\n".join(rows)
