"""Regenerate the drafter's training data: the target's own responses to the training prompts, generated on the
fast engines (or, with --target, on the torch runtime on a GPU) at high concurrency (continuous batching),
greedy plus a sampled share (T = 0.7, as DSpark's data), appended to a JSONL file that a rerun resumes. `train-draft
--responses FILE` trains on it (plain, or xz-compressed as a finished set is committed). Each prompt's
decoding (greedy or sampled, and its seed) depends on the prompt alone; which prompts share a pass depends on
the schedule, and a row's logits may change with its batch in the last bits, so a rerun reproduces the same set
of responses but not always bit for bit, and an interrupted and resumed file differs more: keep the finished
file. No speculation happens here, so neither runtime keeps batch invariance: the target graph drops verification's
padding row (target_graphs.py), the torch runtime batches decode attention (KVCache's batched_decode).
"""
from __future__ import annotations

import argparse
import json
import sys

from dspark_trt.cache import cache_dir
from dspark_trt.errors import DSparkError

DEFAULT_OUT = cache_dir("data", "responses.jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", help="build-engines directory of the target (no drafter needed)")
    source.add_argument("--target", help="the target itself (alias, .gguf file or HF directory) on the torch runtime, "
                        "for a GPU (--device): decode passes attend over all requests in one call per layer")
    parser.add_argument("--device", default="cpu", help="with --target: where it runs (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--prompts", nargs="+", required=True, help="JSONL files of {'turns': [...], 'domain': ...}")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"responses file, resumed if it exists "
                        f"(default {DEFAULT_OUT})")
    parser.add_argument("--limit", type=int, help="prompts per file")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--sampled-share", type=float, default=0.25, help="share of prompts sampled, not greedy")
    parser.add_argument("--sampled-temperature", type=float, default=0.7)
    parser.add_argument("--concurrency", type=int, default=32, help="requests generated at once (engine slots)")
    parser.add_argument("--max-seq-len", type=int, default=1280, help="prompt + response limit per slot; longer "
                        "prompts are skipped and counted")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from dspark_trt.training.data import read_training_prompts, regenerate_responses

    if args.engines and args.device != "cpu":
        raise DSparkError("--device applies to --target: the engines run on ONNX Runtime's CPU provider")
    if not 0.0 <= args.sampled_share <= 1.0:
        raise DSparkError(f"--sampled-share must be in [0, 1], got {args.sampled_share}")
    if args.concurrency < 1 or args.max_new_tokens < 1:
        raise DSparkError("--concurrency and --max-new-tokens must be >= 1")
    prompts = read_training_prompts(args.prompts, args.limit)
    # domains interleaved by the prompts' hashes, so an interrupted file already holds every domain
    prompts.sort(key=lambda p: p.key)
    runtime, tokenizer = _runtime(args)
    stats = regenerate_responses(runtime, tokenizer, prompts, args.out,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed, sampled_share=args.sampled_share,
                                 sampled_temperature=args.sampled_temperature)
    stats.update({"out": str(args.out), "prompts": len(prompts), "concurrency": args.concurrency,
                  **({"engines": str(args.engines)} if args.engines else
                     {"target": args.target, "device": str(runtime.device)})})
    print(json.dumps(stats), file=sys.stdout)
    return 0


def _runtime(args: argparse.Namespace):
    """(runtime, tokenizer): the engines' ONNX Runtime, or the target on the torch runtime on --device; neither
    keeps verification's batch invariance (no speculation happens here)."""
    if args.engines:
        from dspark_trt.graphs.manifest import load_engine_tokenizer
        from dspark_trt.runtimes.ort_runtime import OrtRuntime

        return (OrtRuntime(args.engines, num_slots=args.concurrency, max_seq_len=args.max_seq_len, use_drafter=False,
                           batch_invariant=False), load_engine_tokenizer(args.engines))
    from dspark_trt.devices import resolve_device
    from dspark_trt.models.weights import load_target
    from dspark_trt.runtimes.torch_runtime import TorchRuntime

    device = resolve_device(args.device)
    target, tokenizer = load_target(args.target)
    return (TorchRuntime(target.to(device), None, num_slots=args.concurrency, max_seq_len=args.max_seq_len,
                         batch_invariant=False), tokenizer)
