"""Train a DSpark drafter for a target by self-distillation (DSPARK_SPEC.md section 6).

1. The target regenerates a response to every prompt (batched through the engine; appended to
   OUT/responses.jsonl keyed by prompt hash, so a rerun skips the finished ones).
2. Training: each step takes the target's tap features and teacher logits for a few sequences
   (from a bounded float16 cache after their first use, see training/feature_cache.py), samples anchors in the responses, and trains the drafter on the
   packed teacher-forced blocks with α_ce·CE + α_tv·L1 + α_conf·BCE and position decay exp(-k/4).
3. OUT holds the drafter in DeepSpec format (config.json + model.safetensors, loadable with
   --draft OUT), trainer_state.pt (optimizer and schedule) and train_log.jsonl. Rerunning the same
   command resumes from the last checkpoint and takes exactly the steps the first run would have.

Defaults are chosen for SmolLM2-135M (30 layers, hidden 576, vocabulary 49152):
- block size 7: the paper's (verification width 8); a 135M target verifies 8 tokens at nearly the
  cost of one, so shorter blocks would waste its parallel headroom.
- 2 draft layers: each draft layer costs about one target layer (1/30 of a target pass). The
  paper's 5 layers on 36-layer targets are ~14% of a target pass; 2 layers keep the drafter near
  7% here, where drafting latency matters more because the target itself is so cheap.
- Markov rank 64, vanilla head: with a 49k vocabulary W1 + W2 cost 2·V·r parameters; rank 256
  would be 25M parameters (more than the rest of the trainable drafter) for a first-order bias
  that needs far less capacity on a 576-wide model.
- taps [1, 8, 14, 21, 28]: five layers spread over the depth, never the last (spec 1.2).
- greedy regeneration (--temperature 0): the default serving and evaluation temperature is 0, so
  the drafter learns the argmax chain it will be verified against; use --temperature 0.7
  --top-p 0.8 for the paper's sampled recipe.
- --draft-vocab 8192: the drafter predicts over the 8192 tokens the target emits most in the training
  responses (a sixth of SmolLM2's vocabulary; OUT/draft_vocab.json records the coverage table). The LM
  head and the Markov head's output then cost a sixth, in training and in every draft pass; the tokens
  outside it are still produced exactly, by verification's residual and bonus draws. 0: the whole vocabulary.
- --recipe dflash trains the ablation: no Markov head, no confidence head, cross-entropy only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from collections import Counter
from pathlib import Path

from dspark_trt.cpu import bf16_is_slow
from dspark_trt.devices import resolve_device
from dspark_trt.errors import DSparkError
from dspark_trt.models.drafter_checkpoint import (SMOLLM2_MASK_TOKEN_ID, drafter_config_for_target, init_from,
                                                  load_drafter, random_drafter)
from dspark_trt.models.markov_heads import MARKOV_HEAD_TYPES
from dspark_trt.models.weights import load_target
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.training.code_prompts import other_language_prompts, stdlib_prompts
from dspark_trt.training.draft_vocab import COVERAGE_SIZES, count_response_tokens, coverage_table, select_draft_vocab
from dspark_trt.training.data import (FeatureExtractor, feature_taps, load_samples, read_training_prompts,
                                      regenerate_responses, split_held_out)
from dspark_trt.training.feature_cache import CachedFeatureExtractor, target_identity
from dspark_trt.training.losses import LossWeights
from dspark_trt.training.trainer import PRECISIONS, STATE_FILE, Trainer, TrainConfig

RESPONSES_FILE = "responses.jsonl"
DRAFT_VOCAB_FILE = "draft_vocab.json"
RECIPES = {"dspark": LossWeights(), "dflash": LossWeights(ce=1.0, tv=0.0, conf=0.0)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2", help="alias, .gguf file or HF directory (default smollm2)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", nargs="+", help="JSONL files of {'turns': [...], 'domain': ...}")
    source.add_argument("--responses", help="train on this responses.jsonl of an earlier run as it is, without "
                                            "regenerating (e.g. the same data for an ablation)")
    parser.add_argument("--out", required=True, help="output directory; rerun with the same options to resume "
                                                      "(the drafter's shape is then read from its checkpoint)")
    parser.add_argument("--limit", type=int, help="prompts per file")
    parser.add_argument("--code-extra", type=int, default=0,
                        help="add up to N code prompts made from the standard library and other-language "
                             "restatements of the code prompts (the prompts README's recipe)")
    g = parser.add_argument_group("regeneration")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--gen-batch", type=int, default=8, help="requests generated at once")
    g = parser.add_argument_group("drafter")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="dspark")
    g.add_argument("--init", metavar="DRAFTER", help="start from this drafter's weights ('default': the shipped "
                   "one) instead of random ones; its shape must match the options, its LM head and Markov output "
                   "rows are cut to the draft vocabulary")
    g.add_argument("--block-size", type=int, default=7)
    g.add_argument("--draft-layers", type=int, default=2)
    g.add_argument("--markov-rank", type=int, default=64)
    g.add_argument("--markov-head", choices=MARKOV_HEAD_TYPES, default="vanilla")
    g.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft vocabulary size: the most frequent target tokens of the responses (0: all)")
    g.add_argument("--taps", type=int, nargs="+", help="target layer ids (default: 5 spread, never the last)")
    g.add_argument("--mask-token-id", type=int, default=SMOLLM2_MASK_TOKEN_ID,
                   help=f"token id of the block's mask slots: one that text never contains "
                        f"(default {SMOLLM2_MASK_TOKEN_ID}, SmolLM2's <empty_output>)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000,
                   help="optimizer steps in all; a resumed run may raise it to train on, with the cosine decay "
                        "recomputed over the new total")
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    g.add_argument("--num-anchors", type=int, default=64, help="blocks per sequence")
    g.add_argument("--max-length", type=int, default=1024, help="tokens per training sequence")
    g.add_argument("--min-loss-tokens", type=int, default=14)
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--validate-every", type=int, default=0, metavar="N",
                   help="every N steps, log the teacher-forced τ on held-out sequences (every 100th response, at "
                        "most 64, never trained on) as val_tau")
    g.add_argument("--milestone-every", type=int, default=0, metavar="N",
                   help="also keep the drafter of every N-th step in OUT/milestones/step-N (bfloat16, without the "
                        "target's embeddings: the size of a shipped drafter), for the curve of τ against data seen")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: the drafter's forward and backward under bfloat16 autocast (weights and optimizer "
                        "stay float32; `bench train --precision` measures it), and the target's feature forward "
                        "too (the reference's bf16 target cache; cached features are float16 either way)")
    g.add_argument("--kl-warmup", type=float, default=0.0, metavar="FRAC",
                   help="train the first FRAC of the steps with forward KL to the target in place of the L1 term")
    g.add_argument("--device", default="cpu",
                   help="where the target's feature forward and the drafter's training run: cpu, or an accelerator "
                        "torch knows (cuda, cuda:1); the data, the anchors and the checkpoints are the same either way")
    g.add_argument("--feature-cache", help="directory caching the target's features per sequence (float16), so later "
                                           "epochs and other runs on the same data skip the target forward "
                                           "(default OUT/feature_cache; 'none' to disable)")
    g.add_argument("--feature-cache-gb", type=float, default=4.0, help="disk budget of the feature cache")


def _prompts(args: argparse.Namespace):
    prompts = read_training_prompts(args.prompts, args.limit)
    if args.code_extra > 0:
        code = [p for p in prompts if p.domain == "code"]
        extra = stdlib_prompts() + other_language_prompts(code)
        random.Random(args.seed).shuffle(extra)
        keys = {p.key for p in prompts}
        prompts += [p for p in extra if p.key not in keys][: args.code_extra]
    return prompts


def _check(args: argparse.Namespace) -> None:
    for name in ("block_size", "draft_layers", "steps", "batch_size", "num_anchors", "max_length", "gen_batch",
                 "max_new_tokens", "checkpoint_every", "log_every"):
        if getattr(args, name) <= 0:
            raise DSparkError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("milestone_every", "validate_every"):
        if getattr(args, name) < 0:
            raise DSparkError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.kl_warmup <= 1.0:
        raise DSparkError(f"--kl-warmup must be in [0, 1], got {args.kl_warmup}")
    if args.draft_vocab < 0:
        raise DSparkError(f"--draft-vocab must be >= 0, got {args.draft_vocab}")
    if args.markov_rank < 0:
        raise DSparkError(f"--markov-rank must be >= 0, got {args.markov_rank}")
    if not args.lr > 0:
        raise DSparkError(f"--lr must be positive, got {args.lr}")


def _draft_vocab(args: argparse.Namespace, target, responses: Path, out: Path):
    """The draft vocabulary's target ids (None: the whole vocabulary); its coverage table goes to OUT."""
    vocab = target.config.vocab_size
    if not args.draft_vocab or args.draft_vocab >= vocab:
        return None
    held_out, *rest = count_response_tokens(responses, folds=10)
    fit = sum(rest, Counter())
    counts = fit + held_out
    ids = select_draft_vocab(counts, vocab, args.draft_vocab, always=tuple(target.config.eos_token_ids))
    table = coverage_table(fit, held_out, vocab, sorted({*COVERAGE_SIZES, args.draft_vocab}))
    out.mkdir(parents=True, exist_ok=True)
    (out / DRAFT_VOCAB_FILE).write_text(json.dumps({
        "draft_vocab_size": args.draft_vocab, "response_tokens": sum(counts.values()),
        "coverage_held_out": {str(n): round(c, 5) for n, c in table.items()},
        "note": "coverage: share of the tokens of every 10th response inside the top-N of the other nine"},
        indent=2) + "\n")
    print(f"train-draft: draft vocabulary of {args.draft_vocab} tokens; held-out coverage "
          + ", ".join(f"{n}: {c:.3f}" for n, c in table.items()), file=sys.stderr)
    return ids


def _drafter_config(args: argparse.Namespace, target, out: Path):
    """The checkpoint's config when resuming, else the options' (checked before the long regeneration)."""
    if (out / STATE_FILE).is_file():
        return load_drafter(out).config
    dflash = args.recipe == "dflash"
    try:
        return drafter_config_for_target(
            target.config, block_size=args.block_size, num_draft_layers=args.draft_layers,
            target_layer_ids=args.taps, markov_rank=0 if dflash else args.markov_rank,
            markov_head_type=args.markov_head, enable_confidence_head=not dflash,
            confidence_head_with_markov=not dflash and args.markov_rank > 0, mask_token_id=args.mask_token_id)
    except DSparkError as exc:
        raise DSparkError(f"bad drafter options: {exc}") from exc


def _drafter(args: argparse.Namespace, target, out: Path, config, responses: Path):
    """The checkpoint in OUT when resuming, else a fresh drafter (embed/lm_head copied from the target) over
    the draft vocabulary chosen from the responses."""
    if (out / STATE_FILE).is_file():
        return load_drafter(out)
    draft_ids = _draft_vocab(args, target, responses, out)
    if draft_ids is not None:
        config = dataclasses.replace(config, draft_vocab_size=len(draft_ids))
    drafter = random_drafter(config, seed=args.seed, target=target, draft_ids=draft_ids)
    if args.init:
        init_from(drafter, load_drafter(args.init, target=target))
    return drafter


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.precision == "bf16" and args.device == "cpu" and bf16_is_slow():
        print("train-draft: warning: this CPU has no bfloat16 matmul instructions (avx512_bf16, amx_bf16); bf16 "
              "autocast is emulated there and ran 14x slower than --precision fp32 on such a CPU", file=sys.stderr)
    out = Path(args.out)
    device = resolve_device(args.device)
    target, tokenizer = load_target(args.target)
    config = _drafter_config(args, target, out)
    feature_taps(target.config, config.target_layer_ids)  # checked before the long regeneration
    if args.responses:
        responses = Path(args.responses)
    else:
        responses = out / RESPONSES_FILE
        runtime = TorchRuntime(target.to(device), None, num_slots=args.gen_batch,
                               max_seq_len=min(args.max_length + args.max_new_tokens + 1,
                                               target.config.max_position_embeddings))
        stats = regenerate_responses(runtime, tokenizer, _prompts(args), responses,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed)
        print(f"train-draft: {stats['added']} new responses in {responses}", file=sys.stderr)
        target.cpu()
    # made on the CPU, where checkpoints load, from the target's weights there; then both go to the device once
    drafter = _drafter(args, target, out, config, responses).to(device)
    target.to(device)
    extractor = FeatureExtractor(target, config.target_layer_ids, max_batch=args.batch_size,
                                 max_length=args.max_length, precision=args.precision)
    if args.feature_cache != "none":
        extractor = CachedFeatureExtractor(extractor, args.feature_cache or out / "feature_cache",
                                           target_id=target_identity(target),
                                           max_bytes=int(args.feature_cache_gb * 2**30))
    samples = load_samples(responses, max_length=args.max_length, min_loss_tokens=args.min_loss_tokens)
    train_config = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, num_anchors=args.num_anchors,
                               checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
                               milestone_every=args.milestone_every, validate_every=args.validate_every,
                               loss=RECIPES[args.recipe], kl_warmup_frac=args.kl_warmup,
                               precision=args.precision)
    held_out = []
    if args.validate_every:  # every 100th sequence, at most 64, out of training
        held_out, samples = split_held_out(samples)
    trainer = Trainer(drafter, extractor, samples, train_config, out, held_out=held_out)
    if trainer.restore():
        print(f"train-draft: resuming {out} at step {trainer.step}/{args.steps}", file=sys.stderr)
    records = trainer.train()
    last = records[-1] if records else None
    summary = f"loss {last['loss']:.4f}, teacher-forced τ {last['tau_probabilistic']:.2f}" if last else "no new steps"
    print(f"drafter in {out} ({len(samples)} training sequences, step {trainer.step}; {summary})")
    return 0
