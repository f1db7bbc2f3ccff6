"""The drafter's one-call ONNX graph through OrtDrafter against DeepSpec's reference outputs and the torch drafter."""
import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, tiny_drafter, tiny_target
from dspark_trt import load_drafter
from dspark_trt.export.draft_graph import export_drafter
from dspark_trt.export.weight_quant import (MIN_DEPTH, all_graphs, dequantize_blocks, quantize_blocks,
                                            quantize_columns)
from dspark_trt.graphs.draft_graph import GRAPH_NAMES
from dspark_trt.models.drafter_checkpoint import config_to_dict, drafter_config_for_target, random_drafter
from dspark_trt.runtimes.ort_drafter import OrtDrafter

FIXTURE = SHARED / "fixtures" / "deepspec" / "qwen3_vanilla_b7"
TOL = 1e-4
PROBS_TOL = 1e-5


def _runtime(drafter, tmp_path, weights="fp32", num_slots=4, max_seq_len=64) -> OrtDrafter:
    paths = export_drafter(drafter, tmp_path, weights=weights)
    assert set(paths) == set(GRAPH_NAMES) == {"draft", "context"}
    for path in paths.values():
        onnx.checker.check_model(str(path), full_check=True)
    manifest = {"draft": {"config": config_to_dict(drafter.config)},
                "graphs": {name: {"file": path.name} for name, path in paths.items()}}
    return OrtDrafter(tmp_path, manifest, num_slots=num_slots, max_seq_len=max_seq_len)


def _assert_cache_equals(rt: OrtDrafter, slots, states):
    for slot, state in zip(slots, states):
        assert int(rt.context.lengths[slot]) == state.length
        for layer in range(len(state.keys) if state.length else 0):
            assert np.abs(rt._ctx_k[layer][slot, :, :state.length] - state.keys[layer].numpy()).max() < TOL
            assert np.abs(rt._ctx_v[layer][slot, :, :state.length] - state.values[layer].numpy()).max() < TOL


def test_deepspec_fixture_two_rounds(tmp_path):
    drafter = load_drafter(FIXTURE)
    ref = load_file(FIXTURE / "reference_io.safetensors")
    rt = _runtime(drafter, tmp_path)
    state = drafter.new_state()
    greedy = (torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1))
    for i in range(2):
        features, anchor = ref[f"round{i}.ctx"], ref[f"round{i}.anchor"]
        out = rt.draft(torch.tensor([1]), [features], anchor, *greedy, None)
        with torch.no_grad():
            drafter.extend_context(state, features)
        _assert_cache_equals(rt, [1], [state])  # the context K/V the graph returned, cached
        assert int(rt.context.lengths[1]) == int(ref[f"round{i}.anchor_position"])
        assert out.tokens[0].tolist() == ref[f"round{i}.greedy_tokens"].tolist()
        assert out.probs.shape[-1] == 0  # greedy: q left out, each token's one-hot
        assert torch.equal(out.full_probs(drafter.config.vocab_size)[0],
                           torch.nn.functional.one_hot(out.tokens[0], drafter.config.vocab_size).float())
        assert (out.confidence_logits[0] - ref[f"round{i}.confidence_logits"]).abs().max() < TOL


SAMPLING = {  # (temperature, top_k, top_p) per request: each pass takes one of the graph's three branches
    "greedy": ([0.0, 0.0, 0.0], [0, 0, 0], [1.0, 1.0, 1.0]),
    "temperature": ([1.0, 0.7, 1.3], [0, 0, 0], [1.0, 1.0, 1.0]),
    "mixed": ([0.0, 0.9, 1.2], [0, 3, 0], [1.0, 1.0, 0.6]),  # greedy, top-k, top-p rows in one pass
    "top_k_top_p": ([1.0, 0.9, 1.2], [3, 5, 30], [0.7, 0.95, 0.8]),
}
VARIANTS = {  # markov head, confidence head, confidence head with the Markov features
    "vanilla": dict(markov_head_type="vanilla"),
    "gated": dict(markov_head_type="gated", confidence_head_with_markov=False),
    "rnn": dict(markov_head_type="rnn"),
    "no_markov": dict(markov_rank=0),
    "no_confidence": dict(markov_head_type="vanilla", enable_confidence_head=False),
}


def _variant_drafter(target, **overrides):
    cfg = dict(block_size=4, num_draft_layers=1, target_layer_ids=[0, 1], markov_rank=4,
               mask_token_id=target.config.vocab_size - 1) | overrides
    drafter = random_drafter(drafter_config_for_target(target.config, **cfg), seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # spread the draft distribution so it is neither uniform nor one-hot
        drafter.lm_head.weight.copy_(torch.randn(drafter.lm_head.weight.shape, generator=g) * 2)
    return drafter


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_call_equals_torch(variant, tmp_path):
    """Two rounds of new context (the second over a non-empty cache, one request without new rows), each drafted
    greedy, at temperature only and with top-k/top-p, fed the same uniforms: the same tokens, the same q."""
    target = tiny_target(vocab_size=24, num_layers=2)
    drafter = _variant_drafter(target, **VARIANTS[variant])
    rt = _runtime(drafter, tmp_path)
    slots = [2, 0, 3]
    states = [drafter.new_state() for _ in slots]
    g = torch.Generator().manual_seed(0)
    filtered = 0
    for n_new in ([5, 2, 0], [1, 3, 2]):
        new = [torch.randn(n, 2 * 16, generator=g) for n in n_new]
        for name, (t, k, p) in SAMPLING.items():
            t, k, p = torch.tensor(t), torch.tensor(k), torch.tensor(p)
            uniforms = torch.rand(3, 4, generator=g, dtype=torch.float64)
            anchors = torch.randint(0, 24, (3,), generator=g)
            ref = drafter.draft_batch(states, new, anchors, t, k, p, uniforms)
            ours = rt.draft(torch.tensor(slots), [f if f.shape[0] else None for f in new], anchors, t, k, p, uniforms)
            new = [f[:0] for f in new]  # the context grows once per round
            assert torch.equal(ours.tokens, ref.tokens), name
            assert ours.probs.shape == (3, 4, 0 if name == "greedy" else 24) and ref.probs.shape == (3, 4, 24)
            q = ours.full_probs(24)
            assert (q - ref.probs).abs().max() < PROBS_TOL, name
            assert (q.gather(2, ours.tokens[..., None]) > 0).all()  # never a zero-probability token
            if ref.confidence_logits is None:
                assert ours.confidence_logits is None
            else:
                assert (ours.confidence_logits - ref.confidence_logits).abs().max() < TOL, name
            if name == "top_k_top_p":
                support = (q > 0).sum(-1)
                assert (support[0] <= 3).all() and (support[1] <= 5).all()
                filtered += int((support < 24).sum())
        _assert_cache_equals(rt, slots, states)
    assert filtered > 0  # the filter did cut tokens


def test_heads_absent_means_outputs_absent(tmp_path):
    target = tiny_target(vocab_size=16)
    cfg = drafter_config_for_target(target.config, block_size=3, target_layer_ids=[0], markov_rank=0,
                                    enable_confidence_head=False, mask_token_id=15)
    rt = _runtime(random_drafter(cfg), tmp_path)
    assert [o.name for o in rt.sessions["draft"].get_outputs()] == ["tokens", "probs", "new_k", "new_v"]
    out = rt.draft(torch.tensor([0]), [torch.randn(2, 16)], torch.tensor([4]), torch.zeros(1),
                   torch.zeros(1, dtype=torch.long), torch.ones(1), None)
    assert out.confidence_logits is None and out.tokens.shape == (1, 3)


WIDE = 128  # _wide_target's hidden size: deep enough for its weights to be quantized (weight_quant.MIN_DEPTH)


def _wide_target(**sizes):
    """A target with hidden WIDE (a multiple of the quantization block) and a 2048-token vocabulary, or `sizes`."""
    from dspark_trt.models.target import TargetConfig, TargetModel

    config = TargetConfig(**dict(arch="llama", vocab_size=2048, hidden_size=WIDE, intermediate_size=96, num_layers=2,
                                 num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                                 max_position_embeddings=128, tie_word_embeddings=False, eos_token_ids=[]) | sizes)
    torch.manual_seed(0)
    return TargetModel(config).eval()


@pytest.mark.parametrize("weights", ["fp32", "int8", "int4"])
def test_a_context_extended_step_by_step_drafts_as_if_shipped_as_a_backlog(weights, tmp_path):
    """One semantics for the two drafter graphs: slot 0's context is extended by the `context` graph over three
    skipped steps and it resumes drafting with one step's rows; slot 1 gets all of those rows with its draft,
    as a backlog. Their cached K/V are identical, and so are their drafts (tokens, q, confidence). With int4
    weights only to 1e-5: MatMulNBits' one-row kernel differs from its many-row one on some CPUs (AVX2)."""
    # context projections big enough to be quantized (fc 512 x 256, k/v 256 x 256)
    drafter = _variant_drafter(_wide_target(vocab_size=64, hidden_size=256, num_kv_heads=4, head_dim=64), block_size=4)
    rt = _runtime(drafter, tmp_path, weights=weights, num_slots=2)
    same = torch.equal if weights != "int4" else lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-5)
    if weights != "fp32":
        model = onnx.load(str(tmp_path / "context.onnx"))
        assert not [n for n in model.graph.node if n.op_type == "MatMul"]  # fc, k_proj and v_proj quantized
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(n, 2 * 256, generator=g) for n in (7, 3, 1, 5)]  # a prompt, then rounds of 3, 1, 5 rows
    rt.extend_context(torch.tensor([0]), steps[:1])
    rt.extend_context(torch.tensor([0, 1]), [steps[1], steps[0]])  # batched with another slot's rows
    rt.extend_context(torch.tensor([0]), steps[2:3])
    anchors, uniforms = torch.tensor([5]), torch.rand(1, 4, generator=g, dtype=torch.float64)
    for t, k, p in [(0.0, 0, 1.0), (0.8, 5, 0.9)]:
        sampling = (torch.tensor([t]), torch.tensor([k]), torch.tensor([p]))
        resumed = rt.draft(torch.tensor([0]), [steps[3] if t == 0 else None], anchors, *sampling, uniforms)
        rows = torch.cat(steps[1:]) if t == 0 else None  # slot 1 already holds the prompt rows
        backlog = rt.draft(torch.tensor([1]), [rows], anchors, *sampling, uniforms)
        assert torch.equal(resumed.tokens, backlog.tokens)
        assert same(resumed.probs, backlog.probs)
        assert same(resumed.confidence_logits, backlog.confidence_logits)
    assert rt.context.lengths.tolist() == [16, 16]
    for layer in range(drafter.config.num_hidden_layers):
        assert same(torch.from_numpy(rt._ctx_k[layer][0, :, :16]), torch.from_numpy(rt._ctx_k[layer][1, :, :16]))
        assert same(torch.from_numpy(rt._ctx_v[layer][0, :, :16]), torch.from_numpy(rt._ctx_v[layer][1, :, :16]))
    state = drafter.new_state()
    drafter.extend_context(state, torch.cat(steps))
    if weights == "fp32":
        _assert_cache_equals(rt, [0, 1], [state, state])


def test_context_limit_is_checked(tmp_path):
    target = tiny_target(vocab_size=24)
    rt = _runtime(tiny_drafter(target, block_size=4), tmp_path, max_seq_len=16)
    greedy = (torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1))
    rt.draft(torch.tensor([0]), [torch.randn(12, 32)], torch.tensor([1]), *greedy, None)
    with pytest.raises(Exception, match="slot 0: 12 context rows \\+ 1 new \\+ a block of 4 exceed"):
        rt.draft(torch.tensor([0]), [torch.randn(1, 32)], torch.tensor([1]), *greedy, None)
    with pytest.raises(Exception, match="slot 0: 12 context rows \\+ 5 new exceed the draft context limit 16"):
        rt.extend_context(torch.tensor([0]), [torch.randn(5, 32)])
    rt.extend_context(torch.tensor([0]), [torch.randn(4, 32)])  # a block's room is not needed to extend
    assert int(rt.context.lengths[0]) == 16


def test_weight_quantization_round_trips():
    w = torch.randn(64, 40, generator=torch.Generator().manual_seed(0)).numpy() * 0.1
    q, scales = quantize_columns(w)  # int8: one scale per output column
    assert q.dtype == np.int8 and scales.shape == (40,)
    assert np.all(np.abs(q * scales - w) <= scales / 2 + 1e-7)
    q, scales = quantize_blocks(w, 4, block_size=32)  # int4: MatMulNBits blocks of 32 along K
    assert q.shape == (40, 2, 16) and scales.shape == (40, 2)
    step = np.repeat(scales.T, 32, axis=0)  # [K, N]: each weight's quantization step
    assert np.all(np.abs(dequantize_blocks(q, scales, 4, 64) - w) <= step / 2 + 1e-7)


def test_int8_weights_multiply_exactly_on_this_cpu():
    """ONNX Runtime's uint8 x int8 GEMM equals the exact integer product for the weights quantize_columns
    makes, with activations anywhere in 0..255: on CPUs without VNNI (AVX2) it sums pairs in int16, which
    full-range int8 weights overflow (the int32 results were off by up to 1e5 there)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    q, _ = quantize_columns(g.standard_normal((576, 256)).astype(np.float32))
    q[0] = np.where(q[0] >= 0, q.max(), q.min())  # the extremes, where the pairs' sums are largest
    a = np.full((4, 576), 255, np.uint8)
    a[1:] = g.integers(0, 256, (3, 576))
    node = helper.make_node("MatMulInteger", ["a", "b", "a_zero_point"], ["y"])
    graph = helper.make_graph([node], "int8", [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 576])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 256])],
                              [numpy_helper.from_array(q, "b"), numpy_helper.from_array(np.array(128, np.uint8),
                                                                                        "a_zero_point")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    exact = (a.astype(np.int64) - 128) @ q.astype(np.int64)
    assert np.array_equal(session.run(None, {"a": a})[0], exact)


@pytest.mark.parametrize("variant", ["sample", "filter", "nucleus"])
def test_sampler_graph_draws_as_spec_sampling(variant):
    """The two-level inverse-CDF draw over a vocabulary of several blocks, on every row and uniform, the
    extremes included (a uniform that rounds to 1 lands beyond the cdf: the top token)."""
    import onnxruntime as ort

    from dspark_trt.export.draft_graph import SAMPLER_INPUTS, Sampler, _export
    from dspark_trt.spec.sampling import sample_from_uniform, warp_probs

    g = torch.Generator().manual_seed(0)
    n, vocab = 64, 1000
    logits = torch.randn(n, vocab, generator=g) * 3
    temperature = torch.rand(n, generator=g) + 0.3
    temperature[::9] = 0.0  # greedy rows mixed in
    top_k = torch.randint(1, 40, (n,), generator=g) if variant != "sample" else torch.zeros(n, dtype=torch.long)
    top_p = (torch.rand(n, generator=g) * 0.5 + 0.5) if variant != "sample" else torch.ones(n)
    if variant == "nucleus":  # top-p without top-k on most rows (the sort stops at a bound of the nucleus)
        top_k[: n * 3 // 4] = 0
        top_p[::5] = 0.999
    model = _export(Sampler(variant, vocab), (logits, temperature, top_k, top_p, torch.rand(n)), SAMPLER_INPUTS,
                    ["token", "q"], {name: {0: "rows"} for name in SAMPLER_INPUTS})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q_ref = warp_probs(logits, temperature, top_k, top_p)
    for uniform in [torch.rand(n, generator=g, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
                    torch.full((n,), 1 - 1e-12, dtype=torch.float64)]:
        args = {"logit": logits, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "uniform": uniform.float()}
        token, q = session.run(None, {i.name: args[i.name].numpy() for i in session.get_inputs()})
        assert np.abs(q - q_ref.numpy()).max() < PROBS_TOL
        assert token.tolist() == sample_from_uniform(q_ref, uniform).tolist()


def test_nucleus_bound_holds_the_top_p_set():
    """The sort of a top-p row without top-k stops at a bound that holds every token spec.sampling keeps, and is
    far below the vocabulary when the distribution is peaked."""
    from dspark_trt.export.draft_graph import _nucleus_bound
    from dspark_trt.spec.sampling import warp_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 5000, generator=g) * torch.linspace(0.5, 8, 32).unsqueeze(1)
    top_p = torch.rand(32, generator=g) * 0.9 + 0.05
    kept = (warp_probs(logits, 1.0, 0, top_p) > 0).sum(-1)
    bound = _nucleus_bound(torch.softmax(logits, -1), top_p)
    assert (bound >= kept).all()
    assert (bound[16:] < 500).all()  # the peaked half: a partial sort


@pytest.mark.parametrize("weights, op, min_agreement", [("int8", "MatMulIntegerToFloat", 0.9),
                                                        ("int4", "MatMulNBits", 0.6)])
def test_quantized_weights_draft_like_fp32(weights, op, min_agreement, tmp_path):
    """The big MatMuls (LM head, the backbone's) run on quantized weights, the Markov head's shallow W2 on
    float32 ones; greedy tokens mostly agree with the fp32 graph's, and at T>0 every token is drawn
    from a proper q."""
    drafter = _variant_drafter(_wide_target(), block_size=5, markov_rank=32)
    fp32 = _runtime(drafter, tmp_path / "fp32", num_slots=8)
    quant = _runtime(drafter, tmp_path / weights, weights=weights, num_slots=8)
    assert quant.weights == weights and fp32.weights == "fp32"
    model = onnx.load(str(tmp_path / weights / "draft.onnx"))
    nodes = [n for graph in all_graphs(model.graph) for n in graph.node]
    sizes = {i.name: list(i.dims) for i in model.graph.initializer}
    quantized = [sizes[n.input[1]] for n in nodes if n.op_type == op]
    assert quantized.count([2048, WIDE // 32, 16] if weights == "int4" else [WIDE, 2048]) == 1  # the LM head
    columns = [s[0] if weights == "int4" else s[-1] for s in quantized]  # MatMulNBits: [N, ...]; int8: [K, N]
    assert columns.count(2048) == 1
    if weights == "int4":
        assert all(len(n.input) == 3 for n in nodes if n.op_type == op)  # no zero points: the fast kernels
    floats = [sizes.get(n.input[1], [0]) for n in nodes if n.op_type == "MatMul"]
    assert floats.count([32, 2048]) == 5  # W2 (rank 32: shallower than MIN_DEPTH) stays float32 at the 5 positions
    assert not [s for s in floats if np.prod(s) >= 1 << 16 and s[0] >= MIN_DEPTH]  # every other big weight went
    g = torch.Generator().manual_seed(0)
    slots = torch.arange(8)
    new = [torch.randn(6, 2 * WIDE, generator=g) for _ in slots]
    anchors = torch.randint(0, 2048, (8,), generator=g)
    greedy = (torch.zeros(8), torch.zeros(8, dtype=torch.long), torch.ones(8))
    a, b = fp32.draft(slots, new, anchors, *greedy, None), quant.draft(slots, new, anchors, *greedy, None)
    assert (a.tokens[:, 0] == b.tokens[:, 0]).float().mean() >= min_agreement
    assert (a.tokens == b.tokens).float().mean() >= min_agreement - 0.1
    assert (a.confidence_logits - b.confidence_logits).abs().max() < 0.5
    t, k, p = torch.full((8,), 0.9), torch.tensor([0, 20] * 4), torch.tensor([0.9, 1.0] * 4)
    u = torch.rand(8, 5, generator=g, dtype=torch.float64)
    s = quant.draft(slots, [None] * 8, anchors, t, k, p, u)
    assert torch.allclose(s.probs.sum(-1), torch.ones(8, 5), atol=1e-5)
    assert (s.probs.gather(2, s.tokens[..., None]) > 0).all()
    assert ((s.probs > 0).sum(-1)[1::2] <= 20).all()


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_drafts_do_not_depend_on_the_batch(weights, tmp_path):
    """A request drafts the same block alone and among seven others (int8: activations are quantized per row)."""
    drafter = _variant_drafter(_wide_target(), block_size=5, markov_rank=32)
    rt = _runtime(drafter, tmp_path, weights=weights, num_slots=9)
    g = torch.Generator().manual_seed(1)
    new = [torch.randn(6, 2 * WIDE, generator=g) for _ in range(8)]
    anchors = torch.randint(0, 2048, (8,), generator=g)
    t, k, p = torch.full((8,), 0.8), torch.zeros(8, dtype=torch.long), torch.ones(8)
    u = torch.rand(8, 5, generator=g, dtype=torch.float64)
    batch = rt.draft(torch.arange(8), new, anchors, t, k, p, u)
    alone = rt.draft(torch.tensor([8]), new[3:4], anchors[3:4], t[:1], k[:1], p[:1], u[3:4])
    assert torch.equal(alone.tokens[0], batch.tokens[3])
    assert (alone.probs[0] - batch.probs[3]).abs().max() < 1e-6


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_validation_of_the_draft_graph(weights, tmp_path):
    """build-engines' check of the drafter graphs: fp32 is compared output by output (and the cache row by row,
    the rows each graph wrote under its own name), a quantized graph by its token agreement only."""
    from types import SimpleNamespace

    from dspark_trt.build.validate import _validate_draft

    drafter = _variant_drafter(_wide_target(), block_size=5, markov_rank=32)
    rt = _runtime(drafter, tmp_path, weights=weights, num_slots=3)
    ort_rt = SimpleNamespace(drafter=rt, draft=rt.draft, extend_context=rt.extend_context)
    g = torch.Generator().manual_seed(0)
    states = [drafter.new_state() for _ in range(3)]
    report = {}
    for n_new in ([5, 2, 7], [1, 3, 2]):
        features = [torch.randn(n, 2 * WIDE, generator=g) for n in n_new]
        agree, total = _validate_draft(report, drafter, ort_rt, torch.arange(3), states, features,
                                       torch.randint(0, 2048, (3,), generator=g), g)
        assert total == 3 * 3 * 5 and agree >= 0.8 * total
    if weights == "fp32":
        assert agree == total
        assert set(report) == {"draft:probs", "draft:confidence_logits", "draft:new_k", "draft:new_v",
                               "context:new_k", "context:new_v"}
        assert all(entry["max_abs_error"] < 1e-4 * max(1, entry["scale"]) for entry in report.values())
    else:
        assert report == {}
