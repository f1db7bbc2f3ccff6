"""ONNX Runtime sessions for the exported graphs (CPU, the machine's cores) and feeding them by name."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort


def make_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with intra-op threads = the cores we may use (graph optimisations on)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with the feeds the graph takes: the exporter drops inputs a graph does not use (a vanilla
    Markov step never reads the hidden state), so callers may pass a superset."""
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
