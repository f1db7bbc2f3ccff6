"""The TensorRT build path: optimization profiles from the manifest, the graph copy the ONNX parser gets,
the errors where TensorRT is missing, runtime selection, build-engines' wiring of the TensorRT-flavour
target graph (export/trt_target.py); plan building, TensorRT's own TRT_* ops and TrtRuntime (in-place CUDA
caches) where TensorRT runs: those tests skip here (no GPU, no TensorRT on these machines)."""
import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dspark_trt.build.pipeline import BuildOptions, build_engines
from dspark_trt.build.validate import failures
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.errors import DSparkError
from dspark_trt.export.engines import export_engines
from dspark_trt.export.tensorrt_build import (TENSORRT_MISSING, dim_bounds, profile_shapes, require_tensorrt,
                                              tensorrt_graph)
from dspark_trt.graphs.draft_graph import CONTEXT_INPUTS, draft_feeds, new_rows
from dspark_trt.graphs.fused_target import fused_feeds
from dspark_trt.graphs.manifest import read_manifest, write_manifest
from dspark_trt.graphs.target_graph import step_inputs
from dspark_trt.graphs.verify_tail import no_verify_feeds, verify_feeds
from dspark_trt.models.drafter_checkpoint import load_drafter
from dspark_trt.models.weights import load_target
from dspark_trt.runtimes.kv_cache import KVCache
from dspark_trt_plugins import ort_op, trt_ops_ort

from test_cli_spec import pair  # noqa: F401  (the tiny Qwen3 target + tokenizer + drafter fixture)
from test_fused_target import quantized_target
from test_trt_target import _export, _ops_model, _run_schedule

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
    context_profile = profile_shapes(manifest["graphs"]["context"]["inputs"], _bounds(manifest))
    width, requests = d.num_taps * d.hidden_size, np.arange(MAX_REQUESTS)
    for ctx_len, new in ((MAX_SEQ_LEN - 2 * block - 1, block + 1), (0, 0)):  # a decode step; no new rows at all
        rows = new_rows(requests, [ctx_len] * MAX_REQUESTS, [np.zeros((new, width))] * MAX_REQUESTS, width)
        feeds = draft_feeds(requests, np.zeros(MAX_REQUESTS), [ctx_len] * MAX_REQUESTS, ctx, ctx, rows,
                            np.ones(MAX_REQUESTS), np.zeros(MAX_REQUESTS), np.ones(MAX_REQUESTS),
                            np.zeros((MAX_REQUESTS, block)))
        for name, array in feeds.items():
            assert _fits(array.shape, draft_profile[name]), name
        if new:  # the requests that do not draft: the same rows through the context graph
            for name in CONTEXT_INPUTS:
                assert _fits(getattr(rows, name).shape, context_profile[name]), name


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


# ---- the TensorRT-flavour target graph (export/trt_target.py) ---------------------------------------------
TRT_CAPACITY = 64


@pytest.fixture(scope="module")
def trt_engine(tmp_path_factory):
    """An engine directory whose target is the TensorRT flavour with Q4_1 blocks (no drafter)."""
    out = tmp_path_factory.mktemp("trt_flavour")
    model, blocks = quantized_target("Q4_1")
    manifest = _export(out, model, blocks, capacity=TRT_CAPACITY)
    manifest["max_seq_len"] = TRT_CAPACITY
    write_manifest(out, manifest)
    return out, manifest, model


def test_parser_copy_of_the_trt_flavour(trt_engine):
    """TRT_KVCacheUpdate / TRT_Attention go to the `trt` domain in onnx-tensorrt's layout (attn_mask slot
    empty), DSparkVerify to the plugin fallback; the file ONNX Runtime runs is left alone."""
    out, manifest, _ = trt_engine
    model = onnx.load(str(out / manifest["graphs"]["target"]["file"]))
    parsed = tensorrt_graph(model)
    kinds = {(n.domain, n.op_type) for n in parsed.graph.node if n.op_type.startswith(("TRT_", "DSpark"))}
    assert kinds == {("trt", "TRT_KVCacheUpdate"), ("trt", "TRT_Attention"), ("", "DSparkVerify")}
    assert all(n.input[3] == "" and len(n.input) == 6 for n in parsed.graph.node if n.op_type == "TRT_Attention")
    assert {(o.domain, o.version) for o in parsed.opset_import} >= {("", 23), ("trt", 1)}
    assert all(n.domain == ort_op.DOMAIN for n in model.graph.node if n.op_type.startswith("TRT_"))
    # without the verify tail the parser copy is a valid ONNX model: onnx knows the `trt` layout's schemas
    plain = onnx.ModelProto()
    plain.CopyFrom(parsed)
    tail = [n for n in plain.graph.node if n.op_type in ("DSparkVerify",) or n.name == "gather_verify_rows"]
    for n in tail:
        plain.graph.node.remove(n)
    names = {"verify_rows", "draft_tokens", "draft_probs", "row_offsets", "temperature", "top_k", "top_p", "uniforms"}
    for value in [i for i in plain.graph.input if i.name in names]:
        plain.graph.input.remove(value)
    for value in [o for o in plain.graph.output if o.name in ("accepted", "next_token")]:
        plain.graph.output.remove(value)
    onnx.checker.check_model(plain, full_check=True)


def test_trt_flavour_profiles_admit_the_runtimes_feeds(trt_engine):
    """Every dynamic input (the slot batch included) has a profile; the caches' capacity is static; a full
    decode step (every slot verifying a block at the context limit, slots out of order) and a one-token
    pass beside idle slots fit."""
    _, manifest, model = trt_engine
    cfg = model.config
    block = 4
    bounds = dim_bounds(MAX_BATCH_TOKENS, TRT_CAPACITY, MAX_REQUESTS, block)
    graph = manifest["graphs"]["target"]
    profile = profile_shapes(graph["inputs"], bounds)
    assert profile["past_key_0"] == ((1, cfg.num_kv_heads, TRT_CAPACITY, cfg.head_dim),
                                     (MAX_REQUESTS, cfg.num_kv_heads, TRT_CAPACITY, cfg.head_dim),
                                     (MAX_REQUESTS, cfg.num_kv_heads, TRT_CAPACITY, cfg.head_dim))
    assert "total_sequence_length" not in profile  # a static scalar
    slots = np.arange(MAX_REQUESTS)[::-1]
    lens = [block + 1] * MAX_REQUESTS
    n = sum(lens)
    cases = [(slots, [TRT_CAPACITY - block - 1] * MAX_REQUESTS, lens, verify_feeds(
        np.arange(n), np.zeros(n - MAX_REQUESTS), np.zeros((n - MAX_REQUESTS, cfg.vocab_size)),
        np.arange(0, n + 1, block + 1), np.ones(MAX_REQUESTS), np.zeros(MAX_REQUESTS), np.ones(MAX_REQUESTS),
        np.zeros(n))), ([MAX_REQUESTS - 1], [0], [1], no_verify_feeds(cfg.vocab_size))]
    for case_slots, starts, case_lens, verify in cases:
        inputs = fused_feeds(np.zeros(sum(case_lens), np.int64), case_slots, starts, case_lens, TRT_CAPACITY, "all")
        cache = np.zeros((inputs.batch, cfg.num_kv_heads, TRT_CAPACITY, cfg.head_dim), np.float32)
        feeds = inputs.feeds | verify | {e["name"]: cache for e in graph["inputs"] if e["name"].startswith("past_")}
        assert set(feeds) == {e["name"] for e in graph["inputs"]}
        for name, array in feeds.items():
            if name in profile:
                assert _fits(array.shape, profile[name]), (name, array.shape, profile[name])


def test_build_engines_tensorrt_exports_and_validates_the_trt_flavour(pair, tmp_path, monkeypatch):  # noqa: F811
    """build-engines --backend tensorrt up to the plans (TensorRT itself faked): the TensorRT-flavour target
    (fp32 weights from an HF directory), checked, validated on ONNX Runtime with the drafter, handed to
    build_plans."""
    import dspark_trt.build.pipeline as build

    handed = {}
    monkeypatch.setattr(build, "require_tensorrt", lambda: None)
    monkeypatch.setattr(build, "build_plans", lambda out, manifest, max_batch_tokens, progress:
                        handed.update(out=out, manifest=manifest, max_batch_tokens=max_batch_tokens) or manifest)
    manifest = build_engines(BuildOptions(out=str(tmp_path / "out"), target=str(pair / "target"),
                                          draft=str(pair / "draft"), backend="tensorrt", max_seq_len=64,
                                          max_batch_tokens=32), progress=lambda m: None)
    assert manifest["target"]["graph"] == "trt" and manifest["target"]["weights"] == "fp32"
    assert manifest["target"]["capacity"] == 64 and handed["max_batch_tokens"] == 32
    results = manifest["validation"]["results"]
    assert failures(results, 1e-3) == [] and results["verify_identical"] and results["draft_tokens_identical"]
    assert read_manifest(tmp_path / "out")["target"]["graph"] == "trt"


class _FakePlanSession:
    """TrtSession's interface (bind_input/bind/bind_output/execute, engine aliasing) over the ONNX Runtime
    emulation of a TensorRT-flavour graph, on CPU tensors: `execute` writes each present_* result into the
    tensor bound for it, as TensorRT writes the aliased cache in place."""

    device = "cpu"

    def __init__(self, path, aliases=None):
        self._ort = ort_op.inference_session(path, trt_ops_ort.session_options())
        self.input_names = [i.name for i in self._ort.get_inputs()]
        self.names = self.input_names + [o.name for o in self._ort.get_outputs()]
        self._outputs = self._ort.get_outputs()
        self.bound, self.shapes, self.results = {}, {}, None
        alias = aliases or (lambda name: name.replace("present_", "past_"))
        self.engine = type("Engine", (), {"get_aliased_input_tensor": staticmethod(alias)})()

    def get_outputs(self):
        return self._outputs

    def bind(self, name, tensor):
        self.bound[name] = tensor
        if name in self.input_names:
            self.shapes[name] = tuple(tensor.shape)

    def bind_input(self, name, value):
        tensor = torch.as_tensor(np.ascontiguousarray(value)).clone()
        self.bind(name, tensor)
        return tensor

    def bind_output(self, name):
        if self.results is None:  # every input is bound by now: compute (the caches are not written yet)
            feeds = {n: self.bound[n].numpy() for n in self.input_names}
            self.results = dict(zip([o.name for o in self._outputs], self._ort.run(None, feeds)))
        tensor = torch.empty(self.results[name].shape)
        self.bind(name, tensor)
        return tensor

    def execute(self):
        trt_ops_ort.raise_pending()
        for name, value in self.results.items():
            self.bound[name].copy_(torch.from_numpy(value))  # present_*: into the past buffer itself
        self.results = None


def test_plan_runtime_binds_the_cache_in_place(trt_engine):
    """TrtTargetGraph (TrtRuntime's target step) over a fake plan session: each layer's cache is one
    persistent tensor bound at the same address as past and present for slots [0, B); the results equal the
    emulation's over ragged passes, a rollback, slots out of order and idle slots; a plan whose present
    output does not alias its past input is refused."""
    from dspark_trt.graphs.trt_target import graph_capacity
    from dspark_trt.runtimes.trt_runtime import TrtEmulationRuntime, TrtTargetGraph, _adopt_trt_graph

    out, manifest, model = trt_engine
    path = out / manifest["graphs"]["target"]["file"]
    emulated = TrtEmulationRuntime(out, num_slots=3, max_seq_len=TRT_CAPACITY)
    planned = TrtEmulationRuntime(out, num_slots=3, max_seq_len=TRT_CAPACITY)
    fake = _FakePlanSession(path)
    planned.sessions["target"] = fake
    _adopt_trt_graph(planned, TrtTargetGraph)
    assert isinstance(planned._target, TrtTargetGraph) and planned.verify_in_graph
    seen = []
    original = fake.execute

    def execute():
        k = planned._target._k[0]
        assert fake.bound["past_key_0"].data_ptr() == fake.bound["present_key_0"].data_ptr() == k.data_ptr()
        seen.append(fake.shapes["past_key_0"][0])
        original()

    fake.execute = execute

    def close(steps):
        torch.testing.assert_close(steps[0].logits, steps[1].logits, atol=1e-5, rtol=1e-5)

    _run_schedule([planned, emulated], model.config.vocab_size, close)
    assert seen == [3, 3, 3, 3, 2]  # B = highest slot of the pass + 1
    assert graph_capacity(manifest["graphs"]["target"]) == planned._target._k[0].shape[2] == TRT_CAPACITY
    with pytest.raises(DSparkError, match="does not alias"):
        TrtTargetGraph(_FakePlanSession(path, aliases=lambda name: "past_key_0"), KVCache(model.config, 2, 16),
                       model.config, TRT_CAPACITY)


@needs_trt
def test_tensorrt_runs_its_ops_as_emulated(tmp_path):
    """TensorRT's parser maps the `trt`-domain TRT_KVCacheUpdate / TRT_Attention nodes to its layers, the
    update is aliased in place, and the results equal the emulation's reference semantics."""
    import tensorrt as trt

    from dspark_trt.export.tensorrt_build import _build_plan
    from dspark_trt.runtimes.trt_runtime import TrtSession

    model = tensorrt_graph(_ops_model())
    path = tmp_path / "ops.onnx"
    onnx.save(model, str(path))
    logger = trt.Logger(trt.Logger.WARNING)
    shapes = {"past": ((1, 2, 8, 4), (3, 2, 8, 4), (3, 2, 8, 4)), "update": ((1, 2, 4), (5, 2, 4), (8, 2, 4)),
              "starts": ((1,), (3,), (3,)), "lengths": ((2,), (4,), (4,)),
              "q": ((1, 4, 1, 4), (3, 4, 3, 4), (3, 4, 8, 4)), "kv_lengths": ((1,), (3,), (3,))}
    (tmp_path / "ops.plan").write_bytes(_build_plan(trt, logger, path, shapes, {"clear": ["TF32"]}))
    io = {"inputs": [{"name": i.name} for i in model.graph.input], "outputs": [{"name": "present"}, {"name": "y"}]}
    session = TrtSession(trt, trt.Runtime(logger), tmp_path / "ops.plan", io)
    rng = np.random.default_rng(2)
    lens = np.array([2, 0, 3])
    feeds = {"past": rng.standard_normal((3, 2, 8, 4)).astype(np.float32),
             "update": rng.standard_normal((5, 2, 4)).astype(np.float32), "starts": np.array([3, 1, 5], np.int32),
             "lengths": np.array([0, 2, 2, 5], np.int32), "q": rng.standard_normal((3, 4, 3, 4)).astype(np.float32)}
    feeds["kv_lengths"] = (feeds["starts"] + lens).astype(np.int32)
    present, y = session.run(None, feeds)
    ref_present = trt_ops_ort.kv_cache_update(feeds["past"], feeds["update"], feeds["starts"], feeds["lengths"],
                                              "packed_nhd")
    np.testing.assert_allclose(present, ref_present, atol=1e-6)
    ref_y = trt_ops_ort.attention(feeds["q"], ref_present, ref_present, feeds["lengths"], feeds["kv_lengths"],
                                  causal_kind="lower_right")
    for r, n in enumerate(lens):  # rows past a request's query are unspecified in TensorRT
        np.testing.assert_allclose(y[r, :, :n], ref_y[r, :, :n], atol=1e-4, rtol=1e-4)


@needs_trt
def test_trt_flavour_plan_equals_its_emulation(trt_engine, tmp_path):
    """The Q4_1 TensorRT-flavour target as a plan: TrtRuntime (caches in CUDA, bound in place) gives the
    emulation's logits over ragged passes, a rollback, slots out of order and idle slots."""
    import shutil

    from dspark_trt.export.tensorrt_build import build_plans
    from dspark_trt.runtimes.trt_runtime import TrtEmulationRuntime, TrtRuntime

    out, manifest, _ = trt_engine
    engines = tmp_path / "engines"
    shutil.copytree(out, engines)
    build_plans(engines, read_manifest(engines), MAX_BATCH_TOKENS, max_requests=MAX_REQUESTS)

    def close(steps):
        torch.testing.assert_close(steps[0].logits, steps[1].logits, atol=1e-3, rtol=1e-3)

    _run_schedule([TrtRuntime(engines, num_slots=3, max_seq_len=TRT_CAPACITY),
                   TrtEmulationRuntime(engines, num_slots=3, max_seq_len=TRT_CAPACITY)], 40, close)


@needs_trt
@pytest.mark.slow
def test_plans_generate_the_ort_tokens(pair, tmp_path):  # noqa: F811
    """build-engines --backend tensorrt on the tiny pair; TrtRuntime's greedy tokens equal those of the same
    engine directory emulated on ONNX Runtime."""
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.runtimes.trt_runtime import TrtEmulationRuntime as OrtRuntime
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
