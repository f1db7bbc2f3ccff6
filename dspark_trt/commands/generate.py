"""Generate text with the target model, with DSpark speculation (--draft) or without (--no-spec).

Prints one JSON object per prompt with --json: text, token_ids, num_tokens, accepted_lengths (one
entry per verification round, bonus token included), mean_accepted_length, seconds,
tokens_per_second, and with --logprobs `logprobs` (each output token's log-probability under the
target's raw logits). Greedy unless --temperature > 0. The logit controls (--repetition-penalty,
--presence-penalty, --frequency-penalty, --min-tokens, --bad-word) are those of dspark_trt/spec/controls.py.

With a drafter the default schedule is dspark, whose draft gate decodes plainly where drafting cannot pay.
Without --cost-table its cost table is profiled for these engines on this machine on the first run and
reused after (dspark_trt/engine/cost_cache.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from dspark_trt.engine.cost_cache import default_cost_table
from dspark_trt.engine.factory import EngineOptions, build_engine, default_schedule
from dspark_trt.engine.prompts import chat_prompt_ids, read_prompts_file
from dspark_trt.engine.request import Request, SamplingParams
from dspark_trt.errors import DSparkError
from dspark_trt.serving.text import decode_word_list, encode_word_list
from dspark_trt.spec.scheduler import COST_AWARE_MODES, SCHEDULE_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2", help="alias, .gguf file or HF directory (default smollm2)")
    parser.add_argument("--draft", help="DSpark drafter directory (DeepSpec format)")
    parser.add_argument("--engines", help="engine directory from `dspark-trt build-engines` (ONNX Runtime); "
                                          "replaces --target/--draft")
    parser.add_argument("--no-spec", action="store_true", help="plain autoregressive decoding")
    parser.add_argument("--schedule", choices=SCHEDULE_MODES,
                        help="how many drafts each request verifies per round (default dspark: Algorithm 1 with the "
                             "draft gate; fixed for a drafter without a confidence head)")
    parser.add_argument("--gamma", type=int, help="fixed schedule: drafts verified per round")
    parser.add_argument("--threshold", type=float, default=0.5, help="threshold schedule: confidence cut")
    parser.add_argument("--cost-table", help="cost table JSON from `dspark-trt profile` (dspark/async; default: "
                                             "profiled once for these engines on this machine, then cached)")
    parser.add_argument("--calibration", help="STS calibration JSON from `dspark-trt calibrate`")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompts-file", help="JSONL with {'turns': [...]} lines (first turn is used)")
    parser.add_argument("--limit", type=int, help="use only the first N prompts of --prompts-file")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="0 = off")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="0 = off")
    parser.add_argument("--min-tokens", type=int, default=0, help="no end before this many tokens")
    parser.add_argument("--bad-word", action="append", default=[], help="text never generated (repeatable)")
    parser.add_argument("--logprobs", action="store_true", help="with --json: each output token's log-probability")
    parser.add_argument("--concurrency", type=int, default=1, help="requests decoded at once")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file, args.limit)
    if not prompts:
        raise DSparkError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    if not args.no_spec and args.draft is None and args.engines is None:
        raise DSparkError("speculative decoding needs --draft PATH or --engines DIR (or pass --no-spec)")
    if args.concurrency < 1:
        raise DSparkError(f"--concurrency must be >= 1, got {args.concurrency}")
    schedule = "off" if args.no_spec else args.schedule or default_schedule(args.draft, args.engines)
    options = EngineOptions(
        target=args.target, draft=None if args.no_spec else args.draft, engines=args.engines,
        schedule=schedule, gamma=args.gamma, threshold=args.threshold,
        cost_table=args.cost_table, calibration=args.calibration, num_slots=args.concurrency,
    )
    if schedule in COST_AWARE_MODES and options.cost_table is None:
        cached = default_cost_table(options, log=_say)
        options.cost_table = str(cached.path)
        _say(f"schedule {schedule}, {cached.describe()}")
    engine, tokenizer = build_engine(options)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_ids=tuple(engine.runtime.eos_token_ids),
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens,
                            bad_words=_bad_word_ids(tokenizer, args.bad_word), return_log_probs=args.logprobs)
    requests = [engine.add_request(chat_prompt_ids(tokenizer, text), params) for text in prompts]
    engine.run()
    for request in requests:
        record = result_record(request, tokenizer)
        if args.json:
            print(json.dumps(record))
        else:
            print(record["text"])
            print(f"[{record['num_tokens']} tokens, {record['tokens_per_second']:.1f} tok/s, "
                  f"mean accepted length {record['mean_accepted_length']:.2f}]", file=sys.stderr)
    return 1 if any(r.error for r in requests) else 0


def _say(message: str) -> None:
    print(f"generate: {message}", file=sys.stderr, flush=True)


def _bad_word_ids(tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """Each --bad-word as the token sequence it is banned as, encoded as served bad_words are."""
    return tuple(tuple(w) for w in decode_word_list(encode_word_list(tokenizer, words, "--bad-word")))


def result_record(request: Request, tokenizer) -> dict:
    """The DESIGN.md JSON record of one finished request."""
    if request.error:
        raise DSparkError(f"request {request.request_id} failed: {request.error}")
    seconds = (request.finish_time or time.perf_counter()) - request.arrival_time
    ids = request.output_ids
    record = {
        "text": tokenizer.decode(ids, skip_special_tokens=True),
        "token_ids": ids,
        "num_tokens": len(ids),
        "accepted_lengths": request.stats.accepted_lengths,
        "mean_accepted_length": request.stats.mean_accepted_length,
        "seconds": seconds,
        "tokens_per_second": len(ids) / seconds if seconds > 0 else 0.0,
        "finish_reason": request.finish_reason,
    }
    if request.params.return_log_probs:
        record["logprobs"] = request.output_logprobs
    return record
