"""The TensorRT-flavour target graph's contract: the fused graph's (graphs/fused_target.py), with the
K/V caches' capacity static (TensorRT's IKVCacheUpdateLayer needs a static sequence dimension).

export/trt_target.py builds it; runtimes/trt_runtime.py runs it (TensorRT, or ONNX Runtime emulating
TensorRT's ops). The manifest marks it with target "graph": GRAPH.
"""
from __future__ import annotations

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.fused_target import cache_names

GRAPH = "trt"


def graph_capacity(graph_io: dict) -> int:
    """The static cache capacity of a TensorRT-flavour target graph, from its manifest I/O."""
    entry = next((e for e in graph_io["inputs"] if e["name"] == cache_names(0)[0]), None)
    if entry is None or len(entry["shape"]) != 4 or not isinstance(entry["shape"][2], int):
        raise DSparkError("not a TensorRT-flavour target graph: past_key_0 has no static capacity")
    return entry["shape"][2]
