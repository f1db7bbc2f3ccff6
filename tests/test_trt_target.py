"""The TensorRT flavour of the target graph (export/trt_target.py), validated as ONNX on this CPU machine:
TensorRT's TRT_KVCacheUpdate / TRT_Attention emulated as ONNX Runtime custom ops (plugins/trt_ops_ort.py)
against their documented semantics; the graph's structure (strongly typed, blocked DequantizeLinear,
no ONNX Runtime contrib ops, the fused graph's contract); and the whole graph on ONNX Runtime against
the torch reference and the fused graph, over ragged passes with rollback, slots out of order and idle
slots. Nothing here runs TensorRT (tests/test_tensorrt_build.py holds the TensorRT-only ones)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import tiny_drafter
from dspark_trt.build.validate import failures
from dspark_trt.build.validate_trt import validate_trt_engines
from dspark_trt.errors import DSparkError
from dspark_trt.export.engines import export_engines
from dspark_trt.export.fused_target import build_fused_target
from dspark_trt.export.trt_target import SIGNED, build_trt_target, export_trt_target, pack_int4, signed_blocks
from dspark_trt.graphs.fused_target import INPUTS, cache_names
from dspark_trt.graphs.trt_target import graph_capacity
from dspark_trt.runtimes.kv_cache import KVCache
from dspark_trt.runtimes.ort_runtime import OrtRuntime
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.runtimes.trt_runtime import EmulatedTrtTargetGraph, TrtEmulationRuntime
from dspark_trt_plugins import ort_op, trt_ops_ort

from test_fused_target import quantized_target

CAPACITY = 64
# (slots, query lengths) per pass; ("rollback", slot, length) rolls a slot back
SCHEDULE = [([0, 1, 2], [5, 2, 7]), ([0, 1, 2], [1, 3, 2]), ("rollback", 1, 3), ([2, 0, 1], [4, 1, 2]),
            ([2], [3]), ([1, 0], [2, 1])]


def _state(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _export(tmp_path, model, blocks=None, drafter=None, capacity=CAPACITY, weights="int4"):
    """export_engines with graph "trt" where the weights are `blocks` (the GGUF's, as fused_weights gives)."""
    import dspark_trt.export.trt_target as trt_target

    original = trt_target.fused_weights
    trt_target.fused_weights = lambda target, m, w: _state(m) | (blocks or {}) if w == "int4" else _state(m)
    try:
        return export_engines(model, drafter, tmp_path, graph="trt", weights=weights, source="(test blocks)",
                              max_seq_len=capacity)
    finally:
        trt_target.fused_weights = original


def _run_schedule(runtimes, vocab: int, compare, seed: int = 0) -> None:
    """The same SCHEDULE through every runtime (three slots each); compare(steps) after each pass."""
    for rt in runtimes:
        assert [rt.allocate_slot() for _ in range(3)] == [0, 1, 2]
    g = torch.Generator().manual_seed(seed)
    for entry in SCHEDULE:
        if entry[0] == "rollback":
            for rt in runtimes:
                rt.rollback(entry[1], entry[2])
            continue
        slots, lens = torch.tensor(entry[0]), torch.tensor(entry[1])
        ids = torch.randint(0, vocab, (int(lens.sum()),), generator=g)
        compare([rt.target_forward(ids, slots, lens, "all") for rt in runtimes])


# ---- the emulated TensorRT ops ----------------------------------------------------------------------------
def _lengths(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


@pytest.mark.parametrize("kind", ["none", "upper_left", "lower_right"])
def test_attention_reference_matches_torch(kind):
    """Per request: softmax(Q·Kᵀ)·V over its first kv_len keys with the causal kind's mask, GQA by head
    groups, no implicit scale; padding query rows come back zero."""
    rng = np.random.default_rng(0)
    b, hq, hkv, s, n, d = 3, 4, 2, 5, 9, 8
    q = rng.standard_normal((b, hq, s, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, hkv, n, d)).astype(np.float32) for _ in range(2))
    q_lens, kv_lens = np.array([3, 5, 1]), np.array([7, 5, 9])
    out = trt_ops_ort.attention(q, k, v, _lengths(q_lens), kv_lens.astype(np.int32), causal_kind=kind)
    for r in range(b):
        ql, kl = q_lens[r], kv_lens[r]
        i, j = np.arange(ql)[:, None], np.arange(kl)[None, :]
        mask = {"none": np.ones((ql, kl), bool), "upper_left": j <= i, "lower_right": j <= kl - ql + i}[kind]
        ref = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q[r, :, :ql]), torch.from_numpy(k[r, :, :kl]).repeat_interleave(2, 0),
            torch.from_numpy(v[r, :, :kl]).repeat_interleave(2, 0), attn_mask=torch.from_numpy(mask), scale=1.0)
        np.testing.assert_allclose(out[r, :, :ql], ref.numpy(), atol=2e-6, rtol=1e-5)
        assert not out[r, :, ql:].any()


def test_kv_cache_update_reference_writes_only_the_new_rows():
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((3, 2, 10, 4)).astype(np.float32)
    lens, starts = np.array([2, 0, 3]), np.array([4, 9, 7], np.int32)
    update = rng.standard_normal((5, 2, 4)).astype(np.float32)
    out = trt_ops_ort.kv_cache_update(cache, update, starts, _lengths(lens), update_form="packed_nhd")
    expected = cache.copy()
    expected[0, :, 4:6] = update[0:2].transpose(1, 0, 2)
    expected[2, :, 7:10] = update[2:5].transpose(1, 0, 2)
    np.testing.assert_array_equal(out, expected)
    padded = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    out = trt_ops_ort.kv_cache_update(cache, padded, np.array([0, 3, 8], np.int32))
    np.testing.assert_array_equal(out[1, :, 3:5], padded[1])
    np.testing.assert_array_equal(out[1, :, :3], cache[1, :, :3])
    with pytest.raises(ValueError, match="outside the cache"):
        trt_ops_ort.kv_cache_update(cache, update, np.array([4, 9, 8], np.int32), _lengths(lens), "packed_nhd")
    with pytest.raises(ValueError, match="update_lengths"):
        trt_ops_ort.kv_cache_update(cache, update, starts, None, "packed_nhd")
    with pytest.raises(ValueError, match="linear"):
        trt_ops_ort.kv_cache_update(cache, padded, mode="paged")


def _ops_model():
    """One TRT_KVCacheUpdate feeding one TRT_Attention, emulation layout."""
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    nodes = [trt_ops_ort.make_kv_update_node(["past", "update", "starts", "lengths"], "present", "kv",
                                             update_form="packed_nhd"),
             trt_ops_ort.make_attention_node(["q", "present", "present", "lengths", "kv_lengths"], "y", "attention",
                                             causal_kind="lower_right")]
    inputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in (
        ("past", f, ["b", 2, 8, 4]), ("update", f, ["t", 2, 4]), ("starts", i32, ["b"]), ("lengths", i32, ["b1"]),
        ("q", f, ["b", 4, "s", 4]), ("kv_lengths", i32, ["b"]))]
    outputs = [helper.make_tensor_value_info("present", f, ["b", 2, 8, 4]),
               helper.make_tensor_value_info("y", f, ["b", 4, "s", 4])]
    model = helper.make_model(helper.make_graph(nodes, "ops", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 23), trt_ops_ort.opset_import()])
    model.ir_version = 10
    return model


def test_ops_run_in_onnx_runtime_as_their_reference_and_report_rejections():
    model = _ops_model()
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    y = next(v for v in inferred.graph.output if v.name == "y")
    assert [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim] == ["b", 4, "s", 4]  # like Q
    session = ort.InferenceSession(model.SerializeToString(), trt_ops_ort.session_options(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    lens = np.array([2, 0, 3])
    feeds = {"past": rng.standard_normal((3, 2, 8, 4)).astype(np.float32),
             "update": rng.standard_normal((5, 2, 4)).astype(np.float32), "starts": np.array([3, 1, 5], np.int32),
             "lengths": _lengths(lens), "q": rng.standard_normal((3, 4, 3, 4)).astype(np.float32)}
    feeds["kv_lengths"] = (feeds["starts"] + lens).astype(np.int32)
    present, y = session.run(None, feeds)
    trt_ops_ort.raise_pending()
    ref_present = trt_ops_ort.kv_cache_update(feeds["past"], feeds["update"], feeds["starts"], feeds["lengths"],
                                              "packed_nhd")
    np.testing.assert_array_equal(present, ref_present)
    np.testing.assert_allclose(y, trt_ops_ort.attention(feeds["q"], ref_present, ref_present, feeds["lengths"],
                                                        feeds["kv_lengths"], causal_kind="lower_right"), atol=1e-6)
    feeds["starts"] = np.array([7, 1, 5], np.int32)  # slot 0's two rows would end past the 8 positions
    present, _ = session.run(None, feeds)
    assert np.isnan(present).all()
    with pytest.raises(DSparkError, match="rejected its inputs.*outside the cache"):
        trt_ops_ort.raise_pending()
    trt_ops_ort.raise_pending()  # reported once


def test_nodes_take_the_parser_layout():
    """The parser's copy: domain `trt`, TRT_Attention with the empty attn_mask slot at index 3; onnx knows
    both layouts (schemas), unknown attributes are refused when building."""
    model = _ops_model()
    for node in model.graph.node:
        assert trt_ops_ort.tensorrt_node(node)
    model.opset_import.append(trt_ops_ort.opset_import(trt_ops_ort.TRT_DOMAIN))
    onnx.checker.check_model(model, full_check=True)
    kv, attention = model.graph.node
    assert (kv.domain, list(kv.input)) == ("trt", ["past", "update", "starts", "lengths"])
    assert (attention.domain, list(attention.input)) == ("trt", ["q", "present", "present", "", "lengths",
                                                                 "kv_lengths"])
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["causal_kind"] == b"lower_right" and attrs["query_form"] == attrs["kv_form"] == b"padded_bhnd"
    assert not trt_ops_ort.tensorrt_node(helper.make_node("Add", ["a", "b"], ["c"]))
    with pytest.raises(DSparkError, match="unknown attributes.*scale"):
        trt_ops_ort.make_attention_node(["q", "k", "v", "l", "kl"], "y", "a", scale=0.5)


# ---- the graph --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
def test_signed_blocks_are_the_gguf_weight(fmt):
    """Re-centred codes in the signed range TensorRT takes (zero points must be 0), scales and Q4_1's shifted
    minimums give the GGUF's dequantized weight; int4 packing round-trips through onnx."""
    _, blocks = quantized_target(fmt)
    w = blocks["layers.0.mlp.down_proj.weight"]
    codes, scales, mins = signed_blocks(w)
    lo, hi = (-8, 7) if SIGNED[fmt][0] == TensorProto.INT4 else (-128, 127)
    assert codes.min() >= lo and codes.max() <= hi
    deq = np.repeat(scales, 32, axis=1) * codes + (0 if mins is None else np.repeat(mins, 32, axis=1))
    np.testing.assert_allclose(deq, w.dequantize(), atol=1e-6, rtol=1e-6)
    if SIGNED[fmt][0] == TensorProto.INT4:
        t = helper.make_tensor("w", TensorProto.INT4, list(codes.shape), pack_int4(codes), raw=True)
        np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), codes)


def test_graph_is_the_fused_contract_in_standard_onnx_and_tensorrt_ops():
    model, blocks = quantized_target("Q4_1", qk_norm=True)
    weights = _state(model) | blocks
    trt_model, report = build_trt_target(model.config, weights, CAPACITY, tap_layers=[0, 1])
    fused_model, _ = build_fused_target(model.config, weights, CAPACITY, tap_layers=[0, 1])
    onnx.checker.check_model(trt_model, full_check=True)
    io = (lambda m: ([i.name for i in m.graph.input], [o.name for o in m.graph.output]))
    assert io(trt_model) == io(fused_model)  # same names, same order
    ops = {(n.domain, n.op_type) for n in trt_model.graph.node}
    assert not any(domain == "com.microsoft" for domain, _ in ops)  # nothing only ONNX Runtime knows
    assert {domain for domain, _ in ops} == {"", trt_ops_ort.DOMAIN}
    layers = model.config.num_layers
    count = {op: sum(n.op_type == op for n in trt_model.graph.node) for _, op in ops}
    assert count["TRT_KVCacheUpdate"] == 2 * layers and count["TRT_Attention"] == layers
    assert count["RotaryEmbedding"] == 2 * layers and count["DequantizeLinear"] == 4 * layers + 1
    assert count["RMSNormalization"] == 4 * layers + 1  # two per layer, q/k norms, the final norm
    init = {t.name: t for t in trt_model.graph.initializer}
    for node in trt_model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear":  # weight-only: blocks of 32 along K of MatMul's B, no zero point
            assert len(node.input) == 2 and attrs == {"axis": 0, "block_size": 32}
            codes, scales = init[node.input[0]], init[node.input[1]]
            assert codes.data_type == TensorProto.INT4 and scales.data_type == TensorProto.FLOAT
            assert list(scales.dims) == [codes.dims[0] // 32, codes.dims[1]]
        elif node.op_type == "TRT_Attention":
            assert attrs["causal_kind"] == b"lower_right" and attrs["query_form"] == b"padded_bhnd"
        elif node.op_type == "TRT_KVCacheUpdate":
            assert attrs["update_form"] == b"packed_nhd" and node.output[0].startswith("present_")
            assert node.input[0] == node.output[0].replace("present_", "past_")
    # strongly typed: every float tensor is float32 (precision = tensor types); the caches' capacity is static
    assert {t.data_type for t in init.values()} <= {TensorProto.FLOAT, TensorProto.INT4, TensorProto.INT64,
                                                     TensorProto.INT32}
    past = next(i for i in trt_model.graph.input if i.name == cache_names(0)[0])
    dims = [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim]
    assert dims == ["batch", model.config.num_kv_heads, CAPACITY, model.config.head_dim]
    assert report["matmul_formats"] == {"Q4_1": 9} and report["capacity"] == CAPACITY
    assert {name: dims for name, (_, dims) in INPUTS.items()} == {
        i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in trt_model.graph.input
        if i.name in INPUTS}


def test_q8_blocks_are_int8_and_fp32_weights_plain_matmuls():
    model, blocks = quantized_target("Q8_0")
    q8, _ = build_trt_target(model.config, _state(model) | blocks, CAPACITY)
    codes = {t.name: t.data_type for t in q8.graph.initializer}
    dq = [n for n in q8.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(codes[n.input[0]] == TensorProto.INT8 for n in dq)
    fp32, report = build_trt_target(model.config, _state(model), CAPACITY)
    assert not any(n.op_type == "DequantizeLinear" for n in fp32.graph.node) and report["matmul_formats"] == {"fp32": 9}
    with pytest.raises(DSparkError, match="strictly increasing"):
        build_trt_target(model.config, _state(model), CAPACITY, tap_layers=[1, 0])
    with pytest.raises(DSparkError, match="unknown weights"):
        export_trt_target("x", model, "unused.onnx", CAPACITY, weights="int3")


# ---- the graph on ONNX Runtime ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,qk_norm", [("Q4_1", False), ("Q4_0", True), ("Q8_0", False), ("fp32", True)])
def test_emulated_graph_equals_torch_on_ragged_passes_with_rollback(tmp_path, fmt, qk_norm):
    """Logits through TrtEmulationRuntime equal the torch model holding the blocks' exact dequantization:
    ragged passes, a rollback, slots out of order, a pass beside idle slots, another after it."""
    model, blocks = quantized_target("Q4_1" if fmt == "fp32" else fmt, qk_norm=qk_norm)
    manifest = _export(tmp_path, model, blocks, weights="fp32" if fmt == "fp32" else "int4")
    assert manifest["target"]["graph"] == "trt"
    assert manifest["target"]["matmul_formats"] == {fmt: 9}
    assert graph_capacity(manifest["graphs"]["target"]) == CAPACITY

    def compare(steps):
        torch.testing.assert_close(steps[0].logits, steps[1].logits, atol=5e-5, rtol=1e-5)

    _run_schedule([TrtEmulationRuntime(tmp_path, num_slots=3, max_seq_len=48),
                   TorchRuntime(model, num_slots=3, max_seq_len=48)], 40, compare)


def test_taps_and_cache_of_the_emulated_graph(tmp_path):
    """The graph's taps equal the torch reference's, and the host cache it keeps equals torch's K/V where
    valid (what TensorRT writes in place); idle slots' rows are untouched."""
    model, blocks = quantized_target("Q4_1", seed=1)
    drafter = tiny_drafter(model, block_size=3)
    path, _ = _export_graph(tmp_path, model, blocks, tap_layers=list(drafter.config.target_layer_ids))
    options = trt_ops_ort.session_options()
    session = ort_op.inference_session(path, options)
    cache = KVCache(model.config, num_slots=3, max_seq_len=CAPACITY)
    graph = EmulatedTrtTargetGraph(session, cache, model.config, CAPACITY)
    ref = TorchRuntime(model, drafter, num_slots=3, max_seq_len=CAPACITY)
    for _ in range(3):
        cache.allocate(), ref.allocate_slot()
    g = torch.Generator().manual_seed(3)
    for slots, lens in ([0, 1, 2], [4, 2, 5]), ([2, 0], [3, 1]), ([1], [2]):
        ids = torch.randint(0, 40, (sum(lens),), generator=g)
        before = graph._k[0][0].copy()
        out = graph(ids.numpy(), np.array(slots), np.array(lens), "all", {})
        step = ref.target_forward(ids, torch.tensor(slots), torch.tensor(lens), "all")
        cache.lengths[torch.tensor(slots)] += torch.tensor(lens)
        torch.testing.assert_close(torch.from_numpy(out["logits"]), step.logits, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(out["taps"]), step.taps, atol=5e-5, rtol=1e-5)
        if 0 not in slots:
            np.testing.assert_array_equal(graph._k[0][0], before)
    for layer in range(model.config.num_layers):
        for slot in range(3):
            n = int(cache.lengths[slot])
            torch.testing.assert_close(torch.from_numpy(graph._k[layer][slot, :, :n]),
                                       ref.cache.k[layer][slot, :, :n], atol=5e-5, rtol=1e-5)
            torch.testing.assert_close(torch.from_numpy(graph._v[layer][slot, :, :n]),
                                       ref.cache.v[layer][slot, :, :n], atol=5e-5, rtol=1e-5)


def _export_graph(tmp_path, model, blocks, tap_layers=()):
    import dspark_trt.export.trt_target as trt_target

    original = trt_target.fused_weights
    trt_target.fused_weights = lambda target, m, w: _state(m) | blocks
    try:
        return export_trt_target("(test blocks)", model, tmp_path / "target.onnx", CAPACITY, tap_layers,
                                 verify=False)
    finally:
        trt_target.fused_weights = original


def test_emulated_graph_equals_the_fused_graph(tmp_path):
    """The same GGUF blocks through both flavours: the fused graph at accuracy level 1 (float32 compute) and
    the TensorRT flavour agree to float32 rounding, pass after pass."""
    model, blocks = quantized_target("Q4_1", seed=2)
    _export(tmp_path / "trt", model, blocks)
    import dspark_trt.export.fused_target as fused

    original = fused.fused_weights
    fused.fused_weights = lambda target, m, weights: _state(m) | blocks
    try:
        export_engines(model, None, tmp_path / "fused", graph="fused", weights="int4", source="(test blocks)",
                       max_seq_len=CAPACITY, accuracy_level=1)
    finally:
        fused.fused_weights = original

    def compare(steps):
        torch.testing.assert_close(steps[0].logits, steps[1].logits, atol=5e-5, rtol=1e-5)

    _run_schedule([TrtEmulationRuntime(tmp_path / "trt", num_slots=3, max_seq_len=48),
                   OrtRuntime(tmp_path / "fused", num_slots=3, max_seq_len=48)], 40, compare)


def test_validation_report_and_verification_tail(tmp_path):
    """validate_trt_engines (build-engines' validate step for --backend tensorrt): no failures on a good
    graph; a broken one (wrong weights in the torch reference) is reported."""
    model, blocks = quantized_target("Q4_0", seed=4)
    _export(tmp_path, model, blocks)
    report = validate_trt_engines(tmp_path, model)
    assert report["verify_identical"] is True and failures(report, 1e-3) == []
    other, _ = quantized_target("Q4_0", seed=5)
    bad = validate_trt_engines(tmp_path, other)
    assert any("target" in problem for problem in failures(bad, 1e-3))


def test_validation_with_a_drafter(tmp_path):
    """With a drafter: taps, the drafter's greedy passes on them, verification (the draft graph is the ONNX
    Runtime path's own)."""
    model, blocks = quantized_target("Q4_1", seed=6)
    drafter = tiny_drafter(model, block_size=3, seed=6)
    _export(tmp_path, model, blocks, drafter=drafter)
    report = validate_trt_engines(tmp_path, model, drafter)
    assert failures(report, 1e-3) == [], report
    assert report["draft_tokens_identical"] is True and "target:taps" in report


def test_emulation_runtime_refuses_other_graphs(tmp_path):
    model, _ = quantized_target("Q4_1")
    export_engines(model, None, tmp_path, graph="fused", weights="fp32", max_seq_len=CAPACITY)
    with pytest.raises(DSparkError, match="not the TensorRT flavour"):
        TrtEmulationRuntime(tmp_path, num_slots=2, max_seq_len=32)


def test_requests_beyond_the_static_capacity_are_refused(tmp_path):
    model, blocks = quantized_target("Q4_1")
    _export(tmp_path, model, blocks, capacity=16)
    rt = TrtEmulationRuntime(tmp_path, num_slots=2, max_seq_len=64)
    assert rt.max_seq_len == 16  # the manifest's max_seq_len is the graph's capacity
    slot = rt.allocate_slot()
    rt.target_forward(torch.arange(12), torch.tensor([slot]), torch.tensor([12]), "last")
    with pytest.raises(DSparkError, match="cache limit 16"):
        rt.target_forward(torch.arange(5), torch.tensor([slot]), torch.tensor([5]), "last")


@pytest.mark.slow
def test_smollm2_int4_trt_flavour_equals_torch(smollm2, tmp_path):
    """The default GGUF (SmolLM2-135M: Q4_1 projections, Q8_0 head) as the TensorRT-flavour graph, int4 from
    its own blocks: on ONNX Runtime it equals the torch model (the blocks' exact dequantization)."""
    target, _ = smollm2
    manifest = export_engines(target, None, tmp_path, graph="trt", weights="int4", source="smollm2",
                              max_seq_len=128)
    # qkv, o, gate_up, down per layer; the tied LM head is the embedding's Q8_0 blocks
    assert manifest["target"]["matmul_formats"] == {"Q4_1": 4 * target.config.num_layers, "Q8_0": 1}
    onnx.checker.check_model(str(tmp_path / "target.onnx"), full_check=True)
    report = validate_trt_engines(tmp_path, target)
    assert failures(report, 1e-3) == [], report
    assert report["target:logits"]["greedy_identical"] and report["verify_identical"]
