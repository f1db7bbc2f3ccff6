"""Anchor sampling and teacher-forced block targets (DSPARK_SPEC.md 6.2 and 6.3)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dspark_trt.training.data import Sample


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """Up to num_anchors distinct positions p with loss_mask[p] and loss_mask[p+1], ascending."""
    candidates = torch.nonzero(loss_mask[:-1] & loss_mask[1:]).flatten()
    if candidates.numel() > num_anchors:
        keep = torch.randperm(candidates.numel(), generator=generator)[:num_anchors]
        candidates = candidates[keep.sort().values]
    return candidates


@dataclass
class Blocks:
    """A packed batch of blocks over sequences whose rows are concatenated (offsets per sequence)."""

    anchor_ids: torch.Tensor  # [A]
    anchor_positions: torch.Tensor  # [A]
    anchor_seq: torch.Tensor  # [A]
    labels: torch.Tensor  # [A, B] tokens at p+1..p+B (0 past the end)
    prev_tokens: torch.Tensor  # [A, B] [token p, labels[:-1]] (teacher forcing)
    weights: torch.Tensor  # [A, B] position weight where supervised, else 0
    target_rows: torch.Tensor  # [A, B] packed row of position p+k: its target state predicts label k

    def to(self, device: torch.device) -> "Blocks":
        """Built on the CPU (index arithmetic over the samples), used where the drafter runs."""
        return Blocks(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def build_blocks(samples: list[Sample], anchors: list[torch.Tensor], block_size: int,
                 position_weights: torch.Tensor) -> Blocks:
    """Slot k of the block at p is supervised iff p+k+1 is in the sequence, loss-masked, and so are
    all earlier slots of the block."""
    parts = {name: [] for name in ("ids", "pos", "seq", "labels", "weights", "rows")}
    offset = 0
    k = torch.arange(block_size)
    for i, (sample, p) in enumerate(zip(samples, anchors)):
        n = len(sample)
        label_pos = p.unsqueeze(1) + k + 1  # [a, B]
        inside = label_pos < n
        clipped = label_pos.clamp(max=n - 1)
        labels = torch.where(inside, sample.input_ids[clipped], torch.zeros_like(clipped))
        supervised = torch.cumprod((inside & sample.loss_mask[clipped]).long(), dim=1).bool()
        parts["ids"].append(sample.input_ids[p])
        parts["pos"].append(p)
        parts["seq"].append(torch.full_like(p, i))
        parts["labels"].append(labels)
        parts["weights"].append(supervised.float() * position_weights)
        parts["rows"].append(offset + (label_pos - 1).clamp(max=n - 1))
        offset += n
    labels = torch.cat(parts["labels"])
    anchor_ids = torch.cat(parts["ids"])
    return Blocks(anchor_ids=anchor_ids, anchor_positions=torch.cat(parts["pos"]), anchor_seq=torch.cat(parts["seq"]),
                  labels=labels, prev_tokens=torch.cat([anchor_ids.unsqueeze(1), labels[:, :-1]], dim=1),
                  weights=torch.cat(parts["weights"]), target_rows=torch.cat(parts["rows"]))
