"""The training loop: target features on the fly, packed teacher-forced blocks, the DSpark loss,
AdamW with linear warmup + cosine decay, grad clip, resumable DeepSpec-format checkpoints.

The batch and the anchors of step s depend only on (seed, s), so a run resumed from a checkpoint
takes exactly the steps an uninterrupted run would have taken.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dspark_trt.devices import device_scope
from dspark_trt.errors import DSparkError
from dspark_trt.models.drafter import DSparkDrafter
from dspark_trt.models.drafter_checkpoint import load_drafter, save_drafter
from dspark_trt.training.blocks import build_blocks, sample_anchors
from dspark_trt.training.data import FeatureExtractor, Sample
from dspark_trt.training.losses import LossWeights, dspark_loss, position_weights

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
MILESTONES = "milestones"
LSE_MARGIN = 0.1  # nats: float16 rounding moves logits by ~1e-2, a head that is not the target's by far more
# options a resumed run may change (the others must match its checkpoint's). A larger `steps` extends a run,
# finished or not: the batches go on through the same permutations, the cosine is recomputed over the new total.
BOOKKEEPING = ("checkpoint_every", "log_every", "milestone_every", "validate_every", "precision", "steps")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 6e-4
    warmup_frac: float = 0.04
    batch_size: int = 4  # sequences per step (one packed forward)
    num_anchors: int = 64  # blocks per sequence
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 10
    milestone_every: int = 0  # also keep the drafter of every such step in out_dir/milestones/step-NNNNNN
    validate_every: int = 0  # teacher-forced τ on the held-out sequences every such step (the log's val_tau)
    seed: int = 42
    loss: LossWeights = LossWeights()
    kl_warmup_frac: float = 0.0  # the first steps train with the KL warm start (losses.py)
    # "bf16": the drafter's forward and backward under bfloat16 autocast (weights, optimizer and losses stay
    # float32); these CPUs' bfloat16 matmuls run about 2.5x float32's (docs/benchmarks.md)
    precision: str = "fp32"


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine to 0 (spec 6.5)."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains `drafter` in place; `out_dir` holds the checkpoint, the optimizer state and the log."""

    def __init__(self, drafter: DSparkDrafter, extractor: FeatureExtractor, samples: list[Sample],
                 config: TrainConfig, out_dir: str | Path, held_out: list[Sample] = ()):
        if not samples:
            raise DSparkError("no training samples (every response was shorter than the minimum?)")
        if config.precision not in PRECISIONS:
            raise DSparkError(f"unknown precision '{config.precision}': choose from {', '.join(PRECISIONS)}")
        self.drafter, self.extractor, self.samples, self.config = drafter, extractor, samples, config
        self.held_out = list(held_out)
        self.out_dir = Path(out_dir)
        for frozen in (drafter.embed_tokens, drafter.lm_head):  # copies of the target's, frozen (spec 1.6)
            frozen.weight.requires_grad_(False)
        params = [p for p in drafter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = self._schedule_from(0)
        self.weights = position_weights(drafter.config.block_size, config.loss.decay_gamma)
        self.device = next(drafter.parameters()).device  # the target's features must come on it too
        self.step = 0

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        """Drafter in DeepSpec format in out_dir, plus the optimizer's state and the step, written atomically (the
        rate follows from the step and the config)."""
        save_drafter(self.drafter, self.out_dir)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "config": asdict(self.config)}
        tmp = self.out_dir / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out_dir / STATE_FILE)

    def restore(self) -> bool:
        """Continue from out_dir's checkpoint if there is one; returns whether it did."""
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        defaults = asdict(TrainConfig())  # settings added since the checkpoint was written had their defaults
        saved_config = {**defaults, **state["config"], "loss": {**defaults["loss"], **state["config"]["loss"]}}
        changed = [k for k, v in asdict(self.config).items()
                   if k not in BOOKKEEPING and saved_config[k] != v]
        if changed:
            raise DSparkError(f"{self.out_dir} was trained with other settings ({', '.join(changed)}); pass the "
                              f"same options to resume, or use a new output directory")
        saved = load_drafter(self.out_dir)
        if _shapes(saved) != _shapes(self.drafter):
            raise DSparkError(f"{self.out_dir} holds a drafter of another shape; use a new --out to start over")
        self.drafter.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.schedule = self._schedule_from(self.step)  # under this run's total, which may have been raised since
        return True

    def _schedule_from(self, step: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Warmup + cosine over config.steps, its optimizer's rate set for `step`."""
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.config.steps, self.config.warmup_frac), last_epoch=step - 1)

    # ---- training ----------------------------------------------------------------------------
    def batch_for(self, step: int) -> list[Sample]:
        """Sequences of a step: walk seeded per-epoch permutations of the samples."""
        n, out = len(self.samples), []
        for i in range(step * self.config.batch_size, (step + 1) * self.config.batch_size):
            epoch, index = divmod(i, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch), device="cpu")
            out.append(self.samples[int(perm[index])])
        return out

    def loss_for(self, samples: list[Sample], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Teacher-forced DSpark loss of one packed batch of sequences."""
        features = self.extractor(samples)
        anchors = [sample_anchors(s.loss_mask, self.config.num_anchors, generator) for s in samples]
        blocks = build_blocks(samples, anchors, self.drafter.config.block_size, self.weights).to(self.device)
        if blocks.anchor_ids.numel() == 0:
            raise DSparkError("a training batch has no anchor (responses need at least 2 supervised tokens)")
        with device_scope(self.device), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                       enabled=self.config.precision == "bf16"):
            logits, _, conf = self.drafter.forward_packed(
                features.taps, features.positions, features.seq, blocks.anchor_ids, blocks.anchor_positions,
                blocks.anchor_seq, blocks.prev_tokens)
        logits, conf = logits.float(), None if conf is None else conf.float()
        with torch.no_grad():  # the target's logits at the draft vocabulary (the lm_head holds those rows)
            target_logits = self.drafter.lm_head(features.last_hidden[blocks.target_rows]).float()
        target_lse = None  # a full vocabulary normalises its own logits
        if self.drafter.config.reduced_vocab:  # the rest of the vocabulary's mass comes from the features
            target_lse = features.target_lse[blocks.target_rows]
            # a margin for cached features: the hidden state is stored in float16, the logsumexp was taken in float32
            if bool((torch.logsumexp(target_logits, -1) > target_lse + LSE_MARGIN).any()):
                raise DSparkError("the drafter's LM head is not the target's (its rows of the draft vocabulary "
                                  "hold more probability than the target's whole vocabulary)")
        loss_weights = self.config.loss
        if self.step < self.config.kl_warmup_frac * self.config.steps:
            loss_weights = dataclasses.replace(loss_weights, kl=True)
        return dspark_loss(logits, target_logits, self.drafter.to_draft_ids(blocks.labels), conf, blocks.weights,
                           loss_weights, target_lse)

    @torch.no_grad()
    def validate(self) -> float:
        """Teacher-forced τ (expected accepted length, bonus included) on the held-out sequences, with the same
        anchors every time, so successive values compare checkpoints rather than draws."""
        generator = torch.Generator().manual_seed(self.config.seed)
        size, taus = self.config.batch_size, []
        for i in range(0, len(self.held_out), size):
            batch = self.held_out[i:i + size]
            _, stats = self.loss_for(batch, generator)
            taus.append((stats["tau_probabilistic"], len(batch)))
        return sum(t * n for t, n in taus) / max(1, sum(n for _, n in taus))

    def train(self, progress: bool = True, until: int | None = None) -> list[dict]:
        """Run until config.steps (or an earlier step `until`); returns the log records of this call."""
        until = self.config.steps if until is None else min(until, self.config.steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.drafter.train()
        records, started = [], time.perf_counter()
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        with (self.out_dir / LOG_FILE).open("a") as log:
            while self.step < until:
                step_started = time.perf_counter()
                generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
                loss, stats = self.loss_for(self.batch_for(self.step), generator)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))
                stats["lr"] = self.schedule.get_last_lr()[0]
                self.optimizer.step()
                self.schedule.step()
                self.step += 1
                stats["step"] = self.step
                stats["seconds"] = round(time.perf_counter() - step_started, 4)
                if self.held_out and self.config.validate_every and self.step % self.config.validate_every == 0:
                    stats["val_tau"] = self.validate()
                records.append(stats)
                log.write(json.dumps(stats) + "\n")
                log.flush()
                if progress and (self.step % self.config.log_every == 0 or self.step == self.config.steps):
                    rate = sum(r["positions"] for r in records) / (time.perf_counter() - started)
                    print(f"train-draft: step {self.step}/{self.config.steps} loss {stats['loss']:.4f} "
                          f"ce {stats['ce']:.3f} tv {stats['tv']:.3f} τ~{stats['tau_probabilistic']:.2f} "
                          f"lr {stats['lr']:.2e} ({rate:.0f} supervised block positions/s)", file=sys.stderr)
                if self.step % self.config.checkpoint_every == 0 or self.step == until:
                    self.save()
                if self.config.milestone_every and self.step % self.config.milestone_every == 0:
                    save_drafter(self.drafter, self.out_dir / MILESTONES / f"step-{self.step:06d}",
                                 dtype=torch.bfloat16, share_target_embeddings=True)
        self.drafter.eval()
        return records


def _shapes(drafter: DSparkDrafter) -> dict:
    return {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
