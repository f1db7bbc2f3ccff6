"""Training features from the fast engine: the target's taps computed by the fused int4 graph that serves it.

On CPU the target forward dominates a training step until the feature cache holds the data; the fused int4
graph (export/fused_target.py) prefills about 5x faster than the float32 torch target on these cores. Its
features are also the served target's own: the drafter learns the hidden states it will see. The graph taps
the drafter's layers plus the last one, whose final-normed output gives the teacher's logits through the
drafter's (frozen copy of the) LM head, as FeatureExtractor does.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.export.fused_target import export_fused_target, fused_supported
from dspark_trt.export.ort_session import make_session
from dspark_trt.runtimes.kv_cache import KVCache
from dspark_trt.runtimes.target_graphs import FusedTargetGraph
from dspark_trt.training.data import Sample, TargetFeatures, logsumexp_rows


class OrtFeatureExtractor:
    """FeatureExtractor's call (same TargetFeatures) on a fused int4 target graph kept in `graph_dir`."""

    def __init__(self, source: str, target, tap_layers: list[int], max_batch: int, max_length: int,
                 graph_dir: str | Path):
        last = target.config.num_layers - 1
        if last in tap_layers:
            raise DSparkError(f"tap layer {last} is the target's last layer; the drafter must not tap it (spec 1.2)")
        if not fused_supported(target.config):
            raise DSparkError("the fused graph needs a head size that is a multiple of 16; use --features torch")
        self.target = target
        self.tap_layers = list(tap_layers) + [last]
        folder = Path(graph_dir) / f"features-{self.identity(source, max_length)}"
        if not folder.is_dir():  # built once per (target, taps, length); a whole folder or none
            building = folder.with_name(f".building-{folder.name}-{os.getpid()}")
            export_fused_target(source, target, building / "target.onnx", max_length + 1, self.tap_layers,
                                verify=False)
            os.rename(building, folder)
        cache = KVCache(target.config, num_slots=max_batch, max_seq_len=max_length + 1)
        self.graph = FusedTargetGraph(make_session(folder / "target.onnx"), cache, batch_invariant=False)

    def identity(self, source: str, max_length: int) -> str:
        """Names the graph and, through the feature cache's target id, keeps its features apart from torch's."""
        key = f"{source}|{self.target.config}|{self.tap_layers}|{max_length}|int4"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> TargetFeatures:
        cache = self.graph.cache
        if len(samples) > cache.num_slots:
            raise DSparkError(f"{len(samples)} sequences exceed the feature batch limit {cache.num_slots}")
        lens = torch.tensor([len(s) for s in samples])
        cache.lengths.zero_()
        out = self.graph(torch.cat([s.input_ids for s in samples]).numpy(), np.arange(len(samples)), lens.numpy(),
                         np.zeros(0, dtype=np.int64), {})
        taps = torch.from_numpy(out["taps"])
        h = self.target.config.hidden_size
        last_hidden = self.target.norm(taps[:, -h:])
        return TargetFeatures(
            taps=taps[:, :-h],
            last_hidden=last_hidden,
            target_lse=logsumexp_rows(self.target.lm_head, last_hidden),
            positions=torch.cat([torch.arange(n) for n in lens]),
            seq=torch.repeat_interleave(torch.arange(len(samples)), lens),
        )

