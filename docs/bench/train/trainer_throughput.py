"""Time the trainer of whatever dspark_trt is on PYTHONPATH (full vocabulary, train-draft's default drafter), so
a revision from before `bench train` existed can be measured the same way:

    git worktree add /tmp/before 0112a5b
    PYTHONPATH=/tmp/before python docs/bench/train/trainer_throughput.py RESPONSES.jsonl
"""
import json
import sys
import time

import torch

from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter
from dspark_trt.models.weights import load_target
from dspark_trt.training.blocks import build_blocks, sample_anchors
from dspark_trt.training.data import FeatureExtractor, load_samples
from dspark_trt.training.trainer import Trainer, TrainConfig

STEPS, BATCH, ANCHORS, BLOCK = 3, 4, 64, 7

target, _ = load_target("smollm2")
config = drafter_config_for_target(target.config, block_size=BLOCK, num_draft_layers=2, markov_rank=64)
drafter = random_drafter(config, seed=0, target=target)
samples = load_samples(sys.argv[1], max_length=1024)[: (STEPS + 1) * BATCH]
batches = [samples[i * BATCH:(i + 1) * BATCH] for i in range(STEPS + 1)]  # the first one warms up
extractor = FeatureExtractor(target, config.target_layer_ids, max_batch=BATCH, max_length=1024)
extractor(batches[0])
started = time.perf_counter()
features = [extractor(b) for b in batches]
feature_seconds = (time.perf_counter() - started) / (STEPS + 1)
lookup = {id(b): f for b, f in zip(batches, features)}
trainer = Trainer(drafter, lambda b: lookup[id(b)], samples, TrainConfig(steps=100), "/tmp/trainer-throughput")
seconds, positions = [], []
for i, batch in enumerate(batches):
    started = time.perf_counter()
    loss, _ = trainer.loss_for(batch, torch.Generator().manual_seed(i))
    trainer.optimizer.zero_grad()
    loss.backward()
    trainer.optimizer.step()
    seconds.append(time.perf_counter() - started)
    generator = torch.Generator().manual_seed(i)  # the anchors loss_for drew
    anchors = [sample_anchors(s.loss_mask, ANCHORS, generator) for s in batch]
    positions.append(int((build_blocks(batch, anchors, BLOCK, trainer.weights).weights > 0).sum()))
print(json.dumps({"feature_seconds_per_step": feature_seconds, "step_seconds": seconds[1:], "positions": positions[1:],
                  "positions_per_second_cached": sum(positions[1:]) / sum(seconds[1:]),
                  "positions_per_second_with_features": sum(positions[1:]) / (sum(seconds[1:]) + STEPS * feature_seconds)}))
