"""ONNX Runtime sessions for the exported graphs (CPU, the machine's cores) and feeding them by name.

Every session registers the DSparkVerify custom op library (the target graph ends in that node).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dspark_trt_plugins.ort_op import inference_session, session_options_with_dspark_ops


def make_session(path: str | Path, threads: int | None = None, spin: bool = True) -> ort.InferenceSession:
    """A CPU session with intra-op threads = the cores we may use (graph optimisations on).

    ONNX Runtime's worker threads spin by default after every run, waiting for more work; in a decode
    step the next work is ours (sampling, the drafter's Python loop, the next graph), and on a few
    cores those spinning threads take the cores from it: the drafter's pass ran 2-4x slower. So no
    session spins after its run (`force_spinning_stop`), and `spin=False` (the drafter's one-call graph:
    spinning within its run made it 1.5-1.7x slower on these shared cores) does not spin within its runs
    either. Measured in docs/benchmarks.md."""
    options = session_options_with_dspark_ops()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return inference_session(path, options)


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with the feeds the graph takes: the exporter drops inputs a graph does not use (a vanilla
    Markov step never reads the hidden state), so callers may pass a superset."""
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
