"""Benchmarks, each a ratio measured side by side in one process:

  ar       our AR decode vs transformers generate and, where installed, onnxruntime-genai and llama.cpp
  speedup  batch-1 greedy DSpark vs AR on the same runtime, outputs checked token-identical, with the peers,
           over all prompts and per domain
  served   tokens/s through a real tritonserver vs the in-process engine on the same engines
  load     closed-loop concurrency sweep per schedule mode (in-process, or --served through tritonserver)
  precision  an engine's target vs the float32 torch reference on real prompts (KL, greedy divergence)
  train    drafter training throughput: supervised block positions/s by draft vocabulary
  draft    draft pass cost of engine directories, interleaved, against their one-token target step
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark_trt.engine.prompts import read_prompts_file
from dspark_trt.errors import DSparkError
from dspark_trt.training.trainer import PRECISIONS

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    ar = sub.add_parser("ar", help="our AR decode vs transformers generate")
    ar.add_argument("--target", default="smollm2")
    ar.add_argument("--prompt", default=DEFAULT_PROMPT)
    ar.add_argument("--max-tokens", type=int, default=128)
    ar.add_argument("--repeats", type=int, default=3)
    ar.add_argument("--engines", help="also time ONNX Runtime on this build-engines directory of the target")
    ar.add_argument("--no-genai", action="store_true",
                    help="skip the onnxruntime-genai peer (by default it runs where installed: pip install -e "
                    "'.[peers]'; its int4 model of the target is built once and cached)")
    ar.add_argument("--genai-model", help="onnxruntime-genai model directory to use instead of the cached build")
    ar.add_argument("--genai-accuracy-level", type=int, choices=(0, 1, 2, 3, 4),
                    help="MatMulNBits accuracy level of the built int4 peer model (default: the builder's, 4 on CPU)")
    ar.add_argument("--no-llama-cpp", action="store_true",
                    help="skip the llama.cpp peer (by default it runs where llama-cpp-python is installed: "
                    "pip install -e '.[peers]')")
    speedup = sub.add_parser("speedup", help="batch-1 greedy DSpark vs AR on the same runtime")
    speedup.add_argument("--target", default="smollm2")
    speedup.add_argument("--draft", required=True)
    speedup.add_argument("--prompts-file", action="append", required=True)
    speedup.add_argument("--limit", type=int, default=5, help="prompts per file")
    speedup.add_argument("--max-tokens", type=int, default=128)
    speedup.add_argument("--schedule", default="fixed")
    speedup.add_argument("--engines", help="build-engines directory of the pair: both decoders on ONNX Runtime")
    speedup.add_argument("--cost-table", help="SPS(B) table (`dspark-trt profile`) of these engines: the dspark/async "
                         "schedules read it, and the summary reports the speedup a perfect drafter would reach on it")
    speedup.add_argument("--no-peers", action="store_true",
                         help="skip the peers (transformers, onnxruntime-genai, llama.cpp; plain and prompt lookup)")
    served = sub.add_parser("served", help="tritonserver vs the in-process engine per concurrency, with server RSS")
    served.add_argument("--target", default="smollm2")
    served.add_argument("--draft", default="default", help="drafter directory or 'default' (the shipped one); "
                        "'none': speculation off")
    served.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    served.add_argument("--prompts-file", action="append", help="JSONL prompts (repeatable)")
    served.add_argument("--limit", type=int, default=8, help="prompts per file")
    served.add_argument("--concurrency", default="1,16", help="concurrent client streams, comma separated")
    served.add_argument("--seconds", type=float, default=30, help="seconds of submitting per round and side")
    served.add_argument("--rounds", type=int, default=2, help="alternating (in-process, served) rounds per point")
    served.add_argument("--max-tokens", type=int, default=128)
    served.add_argument("--cache-dir", help="where engines and the repository are built (as for `serve`)")
    precision = sub.add_parser("precision", help="an engine's target vs the float32 torch reference (KL, greedy)")
    precision.add_argument("--target", default="smollm2")
    precision.add_argument("--engines", required=True, help="build-engines directory of the target")
    precision.add_argument("--prompts-file", action="append", required=True)
    precision.add_argument("--limit", type=int, default=4, help="prompts per file")
    precision.add_argument("--max-tokens", type=int, default=128)
    train = sub.add_parser("train", help="drafter training throughput (block positions/s) side by side")
    train.add_argument("--target", default="smollm2")
    train.add_argument("--responses", required=True, help="responses.jsonl (gen-data or train-draft output)")
    train.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up)")
    train.add_argument("--draft-vocab", type=int, nargs="+", default=[0, 8192], help="sizes to time (0: full)")
    train.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                       help="train-draft --precision values to time at each size")
    train.add_argument("--batch-size", type=int, default=4, help="sequences per step (train-draft --batch-size)")
    train.add_argument("--num-anchors", type=int, default=64, help="blocks per sequence (train-draft --num-anchors)")
    draft = sub.add_parser("draft", help="draft pass cost of engine directories, interleaved")
    draft.add_argument("--engines", nargs="+", required=True, help="build-engines directories with drafters")
    draft.add_argument("--rounds", type=int, default=15)
    aiperf = sub.add_parser("aiperf", help="NVIDIA AIPerf against a running `dspark-trt serve` (HTTP generate_stream)")
    aiperf.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")
    aiperf.add_argument("--tokenizer", required=True, help="the served engines' tokenizer directory (AIPerf counts "
                        "tokens with it), e.g. ~/.cache/dspark-trt/serve/engines-*/tokenizer")
    aiperf.add_argument("--prompts-file", action="append", required=True)
    aiperf.add_argument("--limit", type=int, default=16, help="prompts per file")
    aiperf.add_argument("--concurrency", default="1,16", help="concurrent streams, comma separated")
    aiperf.add_argument("--requests", type=int, default=32, help="requests per concurrency")
    aiperf.add_argument("--max-tokens", type=int, default=128)
    aiperf.add_argument("--aiperf", help="the aiperf executable (default: .venv-aiperf's from `make aiperf`)")
    aiperf.add_argument("--artifacts", required=True, help="directory for AIPerf's inputs and exports")
    for p in (ar, speedup, served, precision, train, draft, aiperf):
        p.add_argument("--json", action="store_true")
        p.add_argument("--out", help="also write the result JSON here")
    load = sub.add_parser("load", help="closed-loop concurrency sweep per schedule mode (Pareto frontier)")
    load.add_argument("--target", default="smollm2")
    load.add_argument("--draft", help="drafter directory (needed by every mode but off)")
    load.add_argument("--engines", help="engine directory from build-engines: ONNX Runtime instead of torch "
                      "(with --served: serve these engines)")
    load.add_argument("--prompts-file", action="append", required=True)
    load.add_argument("--limit", type=int, default=16, help="prompts per file")
    load.add_argument("--modes", default="off,fixed1,fixed3,fixed7,threshold,dspark,async",
                      help="comma separated: off, fixedN, threshold, dspark, async")
    load.add_argument("--concurrency", default="1,2,4,8,16,32", help="concurrent client streams, comma separated")
    load.add_argument("--requests", type=int, help="requests per (mode, concurrency) point (default 64)")
    load.add_argument("--seconds", type=float, help="instead of --requests: seconds of submitting per point")
    load.add_argument("--max-tokens", type=int, default=128)
    load.add_argument("--threshold", type=float, default=0.5, help="threshold mode")
    load.add_argument("--cost-table", help="SPS(B) table for dspark/async (default: profiled once at start)")
    load.add_argument("--calibration", help="STS temperatures (default: the one stored next to the drafter)")
    load.add_argument("--served", action="store_true", help="through a real tritonserver (tritonclient gRPC)")
    load.add_argument("--cache-dir", help="--served: where engines are built (as for `serve`)")
    load.add_argument("--llama-cpp-server", action="store_true",
                      help="also run the closed loop against llama.cpp's server (llama-cpp-python[server], "
                           "`make peers`) on the target's GGUF, at every concurrency")
    load.add_argument("--out", required=True, help="directory for load.json and the PNGs")
    load.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    progress = lambda msg: print(f"bench {args.benchmark}: {msg}", file=sys.stderr)  # noqa: E731
    if args.benchmark == "ar":
        from dspark_trt.bench.ar import ar_decode_table, bench_ar

        if args.max_tokens < 1 or args.repeats < 1:
            raise DSparkError("--max-tokens and --repeats must be >= 1")
        if args.genai_model and args.genai_accuracy_level is not None:
            raise DSparkError("--genai-accuracy-level applies to the built peer model, not to --genai-model")
        result = bench_ar(args.target, args.prompt, args.max_tokens, args.repeats, progress, args.engines,
                          genai=not args.no_genai, genai_model=args.genai_model,
                          genai_accuracy_level=args.genai_accuracy_level, llama_cpp=not args.no_llama_cpp)
        ort = (f", onnxruntime {result['onnxruntime_tokens_per_second']:.1f} tok/s "
               f"({result['onnxruntime_vs_torch']:.2f}x torch)" if args.engines else "")
        summary = (f"ours {result['ours_tokens_per_second']:.1f} tok/s{ort}, transformers "
                   f"{result['transformers_tokens_per_second']:.1f} tok/s, ratio {result['ratio']:.2f}x, "
                   f"token-identical: {result['token_identical']}\n" + ar_decode_table(result))
    elif args.benchmark == "speedup":
        from dspark_trt.bench.speedup import bench_speedup, prompt_domain, speedup_table

        by_file = [(prompt_domain(f), read_prompts_file(f, args.limit)) for f in args.prompts_file]
        result = bench_speedup(args.target, args.draft, [p for _, texts in by_file for p in texts], args.max_tokens,
                               args.schedule, progress, peers=not args.no_peers, engines=args.engines,
                               cost_table=args.cost_table, domains=[d for d, texts in by_file for _ in texts])
        summary = speedup_table(result)
    elif args.benchmark == "served":
        from dspark_trt.bench.load import parse_concurrency
        from dspark_trt.bench.served import bench_served, served_table

        prompts = (args.prompt or []) + [p for f in args.prompts_file or [] for p in read_prompts_file(f, args.limit)]
        prompts = prompts or [DEFAULT_PROMPT, "List three uses of a paperclip.", "What is 17 times 23?"]
        if args.seconds <= 0 or args.rounds < 1:
            raise DSparkError(f"--seconds must be > 0 and --rounds >= 1, got {args.seconds} and {args.rounds}")
        draft = None if args.draft == "none" else args.draft
        result = bench_served(args.target, draft, prompts, args.max_tokens, parse_concurrency(args.concurrency),
                              args.seconds, args.rounds, args.cache_dir, progress)
        mismatched = sorted({i for p in result["points"] for i in p["mismatched_prompts"]})
        summary = (served_table(result) + f"\nschedule {result['schedule']}; idle server RSS "
                   f"{result['server_rss_mb_idle']:,.0f} MB; served text equal to in-process: "
                   + ("yes" if not mismatched else f"NO for prompts {mismatched}"))
    elif args.benchmark == "precision":
        from dspark_trt.bench.precision import measure_precision, precision_table
        from dspark_trt.engine.prompts import chat_prompt_ids
        from dspark_trt.graphs.manifest import load_engine_tokenizer

        tokenizer = load_engine_tokenizer(args.engines)
        prompts = [chat_prompt_ids(tokenizer, p) for f in args.prompts_file for p in read_prompts_file(f, args.limit)]
        result = measure_precision(args.engines, args.target, prompts, args.max_tokens, progress)
        summary = precision_table(result)
    elif args.benchmark == "train":
        from dspark_trt.bench.train import measure_training, training_table

        if min(args.steps, args.batch_size, args.num_anchors) < 1 or any(v < 0 for v in args.draft_vocab):
            raise DSparkError("--steps, --batch-size and --num-anchors must be >= 1 and --draft-vocab sizes >= 0")
        result = measure_training(args.target, args.responses, args.steps, tuple(args.draft_vocab),
                                  batch_size=args.batch_size, num_anchors=args.num_anchors,
                                  precisions=tuple(args.precision), progress=progress)
        summary = training_table(result)
    elif args.benchmark == "draft":
        from dspark_trt.bench.draft import bench_draft, draft_table

        result = bench_draft(args.engines, rounds=args.rounds, progress=progress)
        summary = draft_table(result)
    elif args.benchmark == "aiperf":
        from dspark_trt.bench.aiperf import aiperf_table, bench_aiperf
        from dspark_trt.bench.load import parse_concurrency

        if args.requests < 1 or args.max_tokens < 1:
            raise DSparkError("--requests and --max-tokens must be >= 1")
        prompts = [p for f in args.prompts_file for p in read_prompts_file(f, args.limit)]
        result = bench_aiperf(args.url, args.tokenizer, prompts, parse_concurrency(args.concurrency), args.requests,
                              args.max_tokens, Path(args.artifacts), args.aiperf, progress)
        summary = aiperf_table(result)
    elif args.benchmark == "load":
        return _run_load(args, progress)
    else:
        raise DSparkError("choose a benchmark: ar, speedup, served, precision, train, draft, aiperf or load "
                          "(see `dspark-trt bench --help`)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else summary)
    return 0


def _run_load(args: argparse.Namespace, progress) -> int:
    from dspark_trt.bench.load import bench_load, parse_concurrency, parse_modes, summary_table
    from dspark_trt.engine.factory import EngineOptions

    modes, concurrency = parse_modes(args.modes), parse_concurrency(args.concurrency)
    if args.requests is None and args.seconds is None:
        args.requests = 64
    options = EngineOptions(target=args.target, draft=args.draft, engines=args.engines, threshold=args.threshold,
                            calibration=args.calibration)
    prompts = [p for f in args.prompts_file for p in read_prompts_file(f, args.limit)]
    result = bench_load(options, modes, concurrency, prompts, args.max_tokens, args.requests, args.seconds,
                        args.cost_table, Path(args.out), served=args.served, cache_dir=args.cache_dir,
                        llama_cpp_server=args.llama_cpp_server, progress=progress)
    print(json.dumps(result) if args.json else summary_table(result))
    return 0
