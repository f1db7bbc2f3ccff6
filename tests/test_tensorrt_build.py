"""The TensorRT build path: optimization profiles from the manifest, the graph copy the ONNX parser gets,
the errors where TensorRT is missing, runtime selection; plan building and TrtRuntime where TensorRT runs."""
import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.errors import DSparkError
from dspark_trt.export.build import BuildOptions, build_engines
from dspark_trt.export.draft_graph import draft_feeds
from dspark_trt.export.engines import export_engines, read_manifest, write_manifest
from dspark_trt.export.target_graph import step_inputs
from dspark_trt.export.tensorrt_build import (TENSORRT_MISSING, dim_bounds, profile_shapes, require_tensorrt,
                                              tensorrt_graph)
from dspark_trt.models.drafter_checkpoint import load_drafter
from dspark_trt.models.weights import load_target
from dspark_trt_plugins import ort_op

from test_cli_spec import pair  # noqa: F401  (the tiny Qwen3 target + tokenizer + drafter fixture)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
TRT_READY = HAS_TENSORRT and torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not TRT_READY, reason="TensorRT/GPU not available on this machine")
MAX_BATCH_TOKENS, MAX_SEQ_LEN, MAX_REQUESTS = 64, 128, 4


@pytest.fixture(scope="module")
def exported(pair, tmp_path_factory):  # noqa: F811
    """An engine directory of the tiny pair (export only: no validation, no tokenizer)."""
    out = tmp_path_factory.mktemp("trt_engines")
    target, _ = load_target(str(pair / "target"))
    drafter = load_drafter(pair / "draft")
    manifest = export_engines(target, drafter, out)
    manifest["max_seq_len"] = MAX_SEQ_LEN
    write_manifest(out, manifest)
    return out, manifest, target, drafter


def _bounds(manifest):
    return dim_bounds(MAX_BATCH_TOKENS, MAX_SEQ_LEN, MAX_REQUESTS, manifest["draft"]["block_size"])


def _fits(shape, profile):
    lo, _, hi = profile
    return len(shape) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shape, hi))


def test_profiles_cover_every_dynamic_input(exported):
    _, manifest, target, _ = exported
    cfg = target.config
    for name, graph in manifest["graphs"].items():
        profile = profile_shapes(graph["inputs"], _bounds(manifest))
        for entry in graph["inputs"]:
            dynamic = any(isinstance(d, str) for d in entry["shape"])
            assert (entry["name"] in profile) == dynamic, (name, entry)
            if dynamic:
                lo, opt, hi = profile[entry["name"]]
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
                assert [h for h, d in zip(hi, entry["shape"]) if isinstance(d, int)] == \
                       [d for d in entry["shape"] if isinstance(d, int)]
    past_k = profile_shapes(manifest["graphs"]["target"]["inputs"], _bounds(manifest))["past_k"]
    assert past_k[2] == (cfg.num_layers, MAX_REQUESTS, cfg.num_kv_heads, MAX_SEQ_LEN, cfg.head_dim)
    assert past_k[0] == (cfg.num_layers, 1, cfg.num_kv_heads, 1, cfg.head_dim)


def test_profiles_admit_the_runtimes_feeds(exported):
    """A full decode step (every slot verifying a block near the context limit) and a one-token pass fit."""
    _, manifest, target, drafter = exported
    cfg, block = target.config, manifest["draft"]["block_size"]
    target_profile = profile_shapes(manifest["graphs"]["target"]["inputs"], _bounds(manifest))
    cache = np.zeros((cfg.num_layers, MAX_REQUESTS, cfg.num_kv_heads, MAX_SEQ_LEN, cfg.head_dim), np.float32)
    for starts, lens in (([MAX_SEQ_LEN - block - 1] * MAX_REQUESTS, [block + 1] * MAX_REQUESTS), ([0], [1])):
        n = sum(lens)
        feeds = step_inputs(np.zeros(n, np.int64), np.arange(len(lens)), starts, lens, cache, cache, "all").feeds
        for name, array in feeds.items():
            assert _fits(array.shape, target_profile[name]), (name, array.shape, target_profile[name])
    d = drafter.config
    ctx = [np.zeros((MAX_REQUESTS, d.num_key_value_heads, MAX_SEQ_LEN, d.head_dim), np.float32)] * d.num_hidden_layers
    draft_profile = profile_shapes(manifest["graphs"]["draft"]["inputs"], _bounds(manifest))
    width, requests = d.num_taps * d.hidden_size, np.arange(MAX_REQUESTS)
    for ctx_len, new in ((MAX_SEQ_LEN - 2 * block - 1, block + 1), (0, 0)):  # a decode step; no new rows at all
        feeds, _, _ = draft_feeds(requests, np.zeros(MAX_REQUESTS), [ctx_len] * MAX_REQUESTS, ctx, ctx,
                                  [np.zeros((new, width))] * MAX_REQUESTS, width, np.ones(MAX_REQUESTS),
                                  np.zeros(MAX_REQUESTS), np.ones(MAX_REQUESTS), np.zeros((MAX_REQUESTS, block)))
        for name, array in feeds.items():
            assert _fits(array.shape, draft_profile[name]), name


def test_unbounded_dynamic_dim_is_named():
    inputs = [{"name": "x", "shape": ["tokens", "mystery"], "dtype": "float32"}]
    with pytest.raises(DSparkError, match="input 'x'.*mystery"):
        profile_shapes(inputs, dim_bounds(8, 32, 2, 4))


def test_verify_node_is_rewritten_for_the_parser():
    names = [name for name, _ in ort_op.INPUTS]
    outs = [name for name, _ in ort_op.OUTPUTS]
    graph = helper.make_graph(
        [ort_op.make_verify_node(names, outs)], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
        [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ort_op.opset_import()])
    rewritten = tensorrt_graph(model)
    (node,) = rewritten.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain) == ("DSparkVerify", "")
    assert len(attrs) == len(node.attribute)  # no field twice
    assert {k: attrs[k] for k in ("plugin_namespace", "plugin_version", "has_draft_probs")} == \
           {"plugin_namespace": b"dspark", "plugin_version": b"1", "has_draft_probs": 1}
    assert model.graph.node[0].domain == ort_op.DOMAIN  # the original is left alone


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_backend_stops_before_any_work(pair, tmp_path):  # noqa: F811
    with pytest.raises(DSparkError) as info:
        build_engines(BuildOptions(out=str(tmp_path / "out"), target=str(pair / "target"), backend="tensorrt"),
                      progress=lambda m: None)
    assert str(info.value) == TENSORRT_MISSING
    assert "onnxruntime backend works on CPU" in TENSORRT_MISSING
    assert not (tmp_path / "out").exists()
    with pytest.raises(DSparkError, match="TensorRT is not installed"):
        require_tensorrt()


@pytest.mark.skipif(TRT_READY, reason="TensorRT and a GPU are available here")
def test_engine_dir_with_plans_needs_tensorrt(exported, tmp_path):
    out, manifest, _, _ = exported
    with_plans = tmp_path / "with_plans"
    with_plans.mkdir()
    for graph in manifest["graphs"].values():
        (with_plans / graph["file"]).write_bytes((out / graph["file"]).read_bytes())
    write_manifest(with_plans, {**manifest, "backend": "tensorrt",
                                "plans": {"target": {"file": "target.plan", "sha256": "0"}}})
    assert read_manifest(with_plans)["plans"]
    with pytest.raises(DSparkError, match="holds TensorRT plans.*TensorRT/GPU not available.*--backend onnxruntime"):
        build_engine(EngineOptions(engines=str(with_plans)))


@needs_trt
@pytest.mark.slow
def test_plans_generate_the_ort_tokens(pair, tmp_path):  # noqa: F811
    """build-engines --backend tensorrt on the tiny pair; TrtRuntime's greedy tokens equal OrtRuntime's."""
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.runtimes.ort_runtime import OrtRuntime
    from dspark_trt.runtimes.trt_runtime import TrtRuntime
    from dspark_trt.spec.scheduler import make_scheduler

    out = tmp_path / "engines"
    manifest = build_engines(BuildOptions(out=str(out), target=str(pair / "target"), draft=str(pair / "draft"),
                                          backend="tensorrt", max_seq_len=MAX_SEQ_LEN,
                                          max_batch_tokens=MAX_BATCH_TOKENS), progress=lambda m: None)
    assert set(manifest["plans"]) == set(manifest["graphs"])
    assert all((out / p["file"]).stat().st_size > 0 for p in manifest["plans"].values())
    prompt = [5, 6, 7, 8, 9]
    params = SamplingParams(max_tokens=16)
    runs = [Engine(cls(out, num_slots=2), make_scheduler("fixed", 4)).generate([prompt], params)
            for cls in (TrtRuntime, OrtRuntime)]
    assert runs[0][0].output_ids == runs[1][0].output_ids
