"""Drafter training throughput: supervised block positions per second, side by side in one process.

The same training batches (train-draft's default drafter and batch shape) are timed in two parts: the
target's features (paid once per sequence while the feature cache fills, then read from disk) and the drafter's step (forward, backward, optimizer) at each draft vocabulary
size. Throughput with features computed every step and with cached features follow from the two.
"""
from __future__ import annotations

import tempfile
import time

import torch

from dspark_trt.bench.common import environment
from dspark_trt.errors import DSparkError
from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter
from dspark_trt.training.data import FeatureExtractor, load_samples
from dspark_trt.training.draft_vocab import count_response_tokens, select_draft_vocab
from dspark_trt.training.trainer import Trainer, TrainConfig

DRAFTER = {"block_size": 7, "num_draft_layers": 2, "markov_rank": 64}  # train-draft's defaults


def measure_training(target_name: str, responses: str, steps: int = 4, vocab_sizes=(0, 8192),
                     batch_size: int = 4, num_anchors: int = 64, max_length: int = 1024,
                     precisions=("fp32",), progress=lambda message: None) -> dict:
    from dspark_trt.models.weights import load_target

    torch.manual_seed(0)
    target, _ = load_target(target_name)
    samples = load_samples(responses, max_length=max_length)[: (steps + 1) * batch_size]
    if len(samples) < (steps + 1) * batch_size:
        raise DSparkError(f"{responses} holds {len(samples)} usable sequences; {(steps + 1) * batch_size} needed")
    base = drafter_config_for_target(target.config, **DRAFTER)
    batches = [samples[i * batch_size:(i + 1) * batch_size] for i in range(steps + 1)]  # the first one warms up
    progress("target features")
    extractor = FeatureExtractor(target, base.target_layer_ids, max_batch=batch_size, max_length=max_length)
    first = extractor(batches[0])
    started = time.perf_counter()
    computed = [extractor(batch) for batch in batches[1:]]
    seconds = time.perf_counter() - started
    features = {"seconds_per_step": seconds / steps,
                "tokens_per_second": sum(len(s) for b in batches[1:] for s in b) / seconds}
    stored = {id(b): f for b, f in zip(batches, [first, *computed])}
    drafter_rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        counts = count_response_tokens(responses)[0]
        for size, precision in [(size, p) for size in vocab_sizes for p in precisions]:
            progress(f"drafter step: draft vocabulary {size or 'full'}, {precision}")
            reduced = 0 < size < target.config.vocab_size
            ids = select_draft_vocab(counts, target.config.vocab_size, size, tuple(target.config.eos_token_ids)) \
                if reduced else None
            config = drafter_config_for_target(target.config, **DRAFTER, draft_vocab_size=size if reduced else None)
            drafter = random_drafter(config, seed=0, target=target, draft_ids=ids)
            trainer = Trainer(drafter, lambda batch: stored[id(batch)], samples, TrainConfig(
                steps=steps + 1, batch_size=batch_size, num_anchors=num_anchors, checkpoint_every=10**9,
                precision=precision), f"{tmp}/run-{size}-{precision}")
            trainer.batch_for = lambda step: batches[step]
            records = trainer.train(progress=False)[1:]
            seconds = sum(r["seconds"] for r in records) / steps
            positions = sum(r["positions"] for r in records) / steps
            drafter_rows[f"{size or 'full'} {precision}"] = {
                "draft_vocab": size or "full", "precision": precision, "seconds_per_step": seconds,
                "positions_per_step": positions, "positions_per_second_cached": positions / seconds,
                "loss_first_step": records[0]["loss"]}
    for row in drafter_rows.values():
        row["positions_per_second_with_features"] = row["positions_per_step"] / (
            row["seconds_per_step"] + features["seconds_per_step"])
    return {"target": target_name, "responses": str(responses), "steps": steps, "batch_size": batch_size,
            "precisions": list(precisions),
            "num_anchors": num_anchors, "drafter": DRAFTER, "features": features, "drafter_step": drafter_rows,
            "environment": environment()}


def training_table(result: dict) -> str:
    features = result["features"]
    lines = [f"target features: {features['seconds_per_step']:.2f} s/step ({features['tokens_per_second']:.0f} "
             "target tokens/s, paid once per sequence with the feature cache)", "",
             "| draft vocabulary, precision | drafter step (s) | positions/step | positions/s, cached features | "
             "positions/s, features every step |", "|---|---|---|---|---|"]
    for vocab, row in result["drafter_step"].items():
        lines.append(f"| {vocab} | {row['seconds_per_step']:.2f} | {row['positions_per_step']:.0f} | "
                     f"{row['positions_per_second_cached']:.0f} | {row['positions_per_second_with_features']:.0f} |")
    return "\n".join(lines)
