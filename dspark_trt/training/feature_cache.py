"""A bounded on-disk cache of target features, so epochs after the first (and a second run on the
same data, such as the DFlash ablation) skip the target forward that dominates a CPU training step.

Each training sequence's tap outputs and final-normed last hidden state are stored as float16, with the
teacher's full-vocabulary logsumexp as float32, in one file named by a hash of (target identity, tap layers, token ids). Files are written atomically,
so two runs may share a directory. Once the directory holds `max_bytes`, new features are computed
but no longer stored: disk use stays bounded.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from dspark_trt.training.data import FeatureExtractor, Sample, TargetFeatures, packed_rows

FORMAT = "taps-hidden-lse/2"  # part of every file's name: files of another layout are never read


def target_identity(target: torch.nn.Module) -> str:
    """A fingerprint of the target's config and weights (a few sums), so caches never mix targets."""
    params = list(target.parameters())
    sums = [f"{float(p.detach().double().sum()):.6e}" for p in params[:: max(1, len(params) // 8)]]
    return hashlib.sha256((repr(target.config) + "|".join(sums)).encode()).hexdigest()[:16]


class CachedFeatureExtractor:
    """Drop-in for FeatureExtractor (same call, same TargetFeatures) backed by `cache_dir`."""

    def __init__(self, extractor: FeatureExtractor, cache_dir: str | Path, target_id: str,
                 max_bytes: int = 4 * 2**30):
        self.extractor, self.max_bytes = extractor, max_bytes
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"{FORMAT}|{target_id}|{extractor.tap_layers}".encode()
        self.used_bytes = sum(p.stat().st_size for p in self.cache_dir.glob("*.pt"))
        self.hits = self.misses = 0

    def _path(self, sample: Sample) -> Path:
        digest = hashlib.sha256(self.prefix + sample.input_ids.numpy().tobytes()).hexdigest()[:32]
        return self.cache_dir / f"{digest}.pt"

    def __call__(self, samples: list[Sample]) -> TargetFeatures:
        per_sample: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        for sample in samples:
            path = self._path(sample)
            per_sample.append(torch.load(path) if path.is_file() else None)
        missing = [i for i, cached in enumerate(per_sample) if cached is None]
        self.hits += len(samples) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self.extractor([samples[i] for i in missing])
            starts = torch.cumsum(torch.tensor([0] + [len(samples[i]) for i in missing]), 0).tolist()
            for j, i in enumerate(missing):
                rows = slice(starts[j], starts[j + 1])
                per_sample[i] = (fresh.taps[rows].cpu(), fresh.last_hidden[rows].cpu(), fresh.target_lse[rows].cpu())
                self._store(self._path(samples[i]), per_sample[i])
        lens = torch.tensor([len(s) for s in samples])
        device = self.extractor.device
        return TargetFeatures(
            taps=torch.cat([taps.float() for taps, _, _ in per_sample]).to(device),
            last_hidden=torch.cat([hidden.float() for _, hidden, _ in per_sample]).to(device),
            target_lse=torch.cat([lse.float() for _, _, lse in per_sample]).to(device),
            **packed_rows(lens, device),
        )

    def _store(self, path: Path, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        taps, hidden = (t.to(torch.float16).contiguous() for t in features[:2])
        lse = features[2].float().contiguous()
        size = (taps.numel() + hidden.numel()) * 2 + lse.numel() * 4
        if self.used_bytes + size > self.max_bytes:
            return
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save((taps, hidden, lse), tmp)
        os.replace(tmp, path)
        self.used_bytes += size
