"""The fused target graph (ONNX Runtime's LLM operators, K/V appended in place) against the torch
reference, the GGUF block formats it carries, and the batch invariance that greedy identity needs."""
import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_drafter
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.request import SamplingParams
from dspark_trt.errors import DSparkError
from dspark_trt.export.engines import export_engines
from dspark_trt.models.gguf_blocks import decode_blocks
from dspark_trt.models.target import TargetConfig, TargetModel
from dspark_trt.runtimes.ort_runtime import OrtRuntime
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.scheduler import make_scheduler

PASSES = ([5, 2, 7], [1, 3, 2], [4, 1, 1])  # ragged passes over a growing cache


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_dequantize_exactly_as_gguf(fmt):
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[fmt])
    weight = decode_blocks(fmt, raw, 6, 96)
    assert np.array_equal(weight.dequantize(), gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]))
    order = np.array([3, 0, 5, 1, 2, 4])
    assert np.array_equal(weight.rows(order).dequantize(), weight.dequantize()[order])


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_packing_is_the_layout_onnx_runtime_reads(bits):
    """Codes, scales and zero points packed by graphs/matmul_nbits.py, with an odd number of blocks per row (a
    padded zero-point byte), give ONNX Runtime's MatMulNBits the product of the weight they stand for."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dspark_trt.graphs.matmul_nbits import pack_nibbles, pack_zero_points

    rng = np.random.default_rng(bits)
    n, k = 5, 96  # 3 blocks of 32
    q = rng.integers(0, 1 << bits, (n, 3, 32), dtype=np.uint8)
    zp = rng.integers(0, 1 << bits, (n, 3), dtype=np.uint8)
    scales = (rng.random((n, 3)) * 0.1 + 0.01).astype(np.float32)
    weight = ((q.astype(np.float32) - zp[..., None]) * scales[..., None]).reshape(n, k)
    inits = [numpy_helper.from_array(pack_nibbles(q) if bits == 4 else q, "q"),
             numpy_helper.from_array(scales.reshape(-1), "scales"),
             numpy_helper.from_array(pack_zero_points(zp, bits), "zp")]
    node = helper.make_node("MatMulNBits", ["x", "q", "scales", "zp"], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "packing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weight.T, rtol=1e-5, atol=1e-5)


def quantized_target(fmt: str = "Q4_1", seed: int = 0, qk_norm: bool = False):
    """A small random target whose 2-D weights are GGUF blocks of `fmt` (the torch model holds their exact
    dequantization, as load_target does for a GGUF): (model, {name: BlockWeight})."""
    config = TargetConfig(arch="qwen3" if qk_norm else "llama", vocab_size=40, hidden_size=64,
                          intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
                          tie_word_embeddings=False, eos_token_ids=[])
    torch.manual_seed(seed)
    model = TargetModel(config).eval()
    blocks = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                n, k = param.shape
                raw = gguf.quants.quantize(param.numpy() * 3, gguf.GGMLQuantizationType[fmt])
                blocks[name] = decode_blocks(fmt, raw, n, k)
                param.copy_(torch.from_numpy(blocks[name].dequantize()))
            else:
                param.copy_(1 + 0.1 * torch.randn(param.shape))
    return model, blocks


def export_quantized(tmp_path, model, blocks, accuracy_level: int, drafter=None, lm_head: str = "gguf"):
    import dspark_trt.export.fused_target as fused

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    original = fused.fused_weights
    fused.fused_weights = lambda target, m, weights: state | blocks
    try:
        return export_engines(model, drafter, tmp_path, graph="fused", weights="int4", source="(test blocks)",
                              max_seq_len=256, accuracy_level=accuracy_level, lm_head=lm_head)
    finally:
        fused.fused_weights = original


def _passes(runtime_a, runtime_b, vocab: int, compare) -> None:
    """Run the same ragged passes through both runtimes (slots 0..2) and compare each step."""
    slots = torch.tensor([runtime_a.allocate_slot() for _ in range(3)])
    assert [runtime_b.allocate_slot() for _ in range(3)] == slots.tolist()
    g = torch.Generator().manual_seed(0)
    for lens in PASSES:
        ids = torch.randint(0, vocab, (sum(lens),), generator=g)
        compare(runtime_a.target_forward(ids, slots, torch.tensor(lens), "all"),
                runtime_b.target_forward(ids, slots, torch.tensor(lens), "all"))
    runtime_a.rollback(int(slots[1]), 3)  # rejected rows are overwritten by the next pass
    runtime_b.rollback(int(slots[1]), 3)
    ids = torch.randint(0, vocab, (6,), generator=g)
    compare(runtime_a.target_forward(ids, slots, torch.tensor([1, 4, 1]), "all"),
            runtime_b.target_forward(ids, slots, torch.tensor([1, 4, 1]), "all"))


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_fused_fp32_graph_equals_torch_with_taps_and_rollback(tmp_path, qk_norm):
    model, _ = quantized_target(qk_norm=qk_norm)
    drafter = tiny_drafter(model, block_size=3)
    manifest = export_engines(model, drafter, tmp_path, graph="fused", weights="fp32", max_seq_len=256)
    assert manifest["target"]["graph"] == "fused" and "past_key_0" in {
        i["name"] for i in manifest["graphs"]["target"]["inputs"]}

    def close(ours, ref):
        torch.testing.assert_close(ours.logits, ref.logits, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(ours.taps, ref.taps, atol=2e-4, rtol=1e-4)

    _passes(OrtRuntime(tmp_path, num_slots=3, max_seq_len=64), TorchRuntime(model, drafter, num_slots=3,
                                                                            max_seq_len=64), 40, close)


@pytest.mark.parametrize("lm_head", ["gguf", "fp32"])
def test_int4_blocks_at_accuracy_level_1_equal_their_dequantized_reference(tmp_path, lm_head):
    """Q4_1 carried as MatMulNBits (zero point 0) + minimums x block sums: with float32 compute the graph
    computes exactly what the GGUF's blocks say, up to float32 rounding; so does a float32 LM head."""
    model, blocks = quantized_target("Q4_1")
    manifest = export_quantized(tmp_path, model, blocks, accuracy_level=1, lm_head=lm_head)
    # qkv, o, gate_up, down x 2 layers + head
    assert manifest["target"]["matmul_formats"] == ({"Q4_1": 9} if lm_head == "gguf" else {"Q4_1": 8, "fp32": 1})
    assert manifest["target"]["lm_head"] == lm_head

    def close(ours, ref):
        torch.testing.assert_close(ours.logits, ref.logits, atol=2e-4, rtol=1e-4)

    _passes(OrtRuntime(tmp_path, num_slots=3, max_seq_len=64), TorchRuntime(model, num_slots=3, max_seq_len=64),
            40, close)


@pytest.mark.parametrize("fmt,lm_head", [("Q4_1", "gguf"), ("Q8_0", "gguf"), ("Q4_1", "fp32")])
def test_accuracy_level_4_is_batch_invariant(tmp_path, fmt, lm_head):
    """A row's logits do not depend on which rows share its pass: request A's tokens fed one per pass
    (alone) equal, bit for bit, the same tokens fed four at a time beside other requests' rows (the float32
    head's Gemm is probed too: graphs/one_row_matmuls.py)."""
    from dspark_trt.graphs.one_row_matmuls import matmul_configs

    model, blocks = quantized_target(fmt)
    manifest = export_quantized(tmp_path, model, blocks, accuracy_level=4, lm_head=lm_head)
    assert ((64, 40, 32, False, 0) in matmul_configs(tmp_path / manifest["graphs"]["target"]["file"])) == \
        (lm_head == "fp32")
    tokens = torch.randint(0, 40, (13,), generator=torch.Generator().manual_seed(1))
    alone = OrtRuntime(tmp_path, num_slots=4, max_seq_len=64)
    slot = alone.allocate_slot()
    step = alone.target_forward(tokens[:5], torch.tensor([slot]), torch.tensor([5]), "all")
    single = [step.logits]
    for t in tokens[5:]:
        single.append(alone.target_forward(t.reshape(1), torch.tensor([slot]), torch.tensor([1]), "all").logits)
    single = torch.cat(single)

    shared = OrtRuntime(tmp_path, num_slots=4, max_seq_len=64)
    slots = [shared.allocate_slot() for _ in range(3)]  # A gets slot 0, others sit beside it
    g = torch.Generator().manual_seed(2)
    rows, fed = [], 0
    for lens in ([5, 9, 2], [4, 1, 7], [4, 3, 8]):  # A: 5 then 4 + 4 tokens, beside 1..9-row requests
        ids = torch.cat([tokens[fed:fed + lens[0]], torch.randint(0, 40, (sum(lens[1:]),), generator=g)])
        step = shared.target_forward(ids, torch.tensor(slots), torch.tensor(lens), "all")
        rows.append(step.logits[:lens[0]])
        fed += lens[0]
    assert torch.equal(torch.cat(rows), single)


def test_the_one_row_probe_predicts_whether_the_graph_needs_its_matmul_padding(tmp_path):
    """one_row_matmuls_match answers, for the graph's own MatMulNBits configurations, whether a lone token's
    logits equal the same token's inside a longer pass when the matmuls see it alone (no padding row): on
    this CPU, whichever way it goes (AVX2 CPUs differ, AVX-512 ones agree); one_row_padding asks it for the
    layers and the LM head apart, and the runtime pads each as it says."""
    from dspark_trt.graphs.manifest import read_manifest
    from dspark_trt.graphs.one_row_matmuls import matmul_configs, one_row_matmuls_match, one_row_padding

    model, blocks = quantized_target("Q4_1")
    export_quantized(tmp_path, model, blocks, accuracy_level=4)
    graph = tmp_path / read_manifest(tmp_path)["graphs"]["target"]["file"]
    configs = matmul_configs(graph)
    assert {(k, n) for k, n, *_ in configs} == {(64, 64 + 2 * 2 * 16), (64, 64), (64, 2 * 96), (96, 64), (64, 40)}
    assert all(bits == 4 and zero_points and level == 4 for _, _, bits, zero_points, level in configs)
    runtime = OrtRuntime(tmp_path, num_slots=1, max_seq_len=64)
    threads = runtime.sessions["target"].get_session_options().intra_op_num_threads
    layers, head = [c for c in configs if c[1] != 40], [c for c in configs if c[1] == 40]
    assert one_row_padding(graph, 40, threads) == (not one_row_matmuls_match(tuple(layers), threads),
                                                   not one_row_matmuls_match(tuple(head), threads))
    assert (runtime._target.pad_matmuls, runtime._target.pad_head) == one_row_padding(graph, 40, threads)
    tokens = torch.randint(0, 40, (9,), generator=torch.Generator().manual_seed(3))
    slot = runtime.allocate_slot()
    together = runtime.target_forward(tokens, torch.tensor([slot]), torch.tensor([9]), "all").logits

    def one_at_a_time(pad: bool) -> torch.Tensor:
        runtime._target.pad_matmuls = runtime._target.pad_head = pad
        runtime.rollback(slot, 5)
        return torch.stack([runtime.target_forward(t.reshape(1), torch.tensor([slot]), torch.tensor([1]),
                                                   "all").logits[0] for t in tokens[5:]])

    assert torch.equal(one_at_a_time(pad=True), together[5:])  # padded: equal on every CPU
    # unpadded, as it runs where the probe says the kernels agree: equal exactly when they do
    assert torch.equal(one_at_a_time(pad=False), together[5:]) == one_row_matmuls_match(configs)


def test_a_slot_fills_to_the_limit_with_the_padding_rows_position_kept(tmp_path):
    """The padding row of a one-token query takes the position after it, so the pool keeps one: the
    runtime's limit is the graph's less one, and the last token appended alone still equals the same
    token inside one long pass (its padding rows never disturbed a later token)."""
    model, blocks = quantized_target("Q4_1")
    export_quantized(tmp_path, model, blocks, accuracy_level=4)  # rotary table and limit: 256 positions
    runtime = OrtRuntime(tmp_path, num_slots=1, max_seq_len=4096)
    assert runtime.max_seq_len == 255
    tokens = torch.randint(0, 40, (255,), generator=torch.Generator().manual_seed(4))
    slot = runtime.allocate_slot()
    runtime.target_forward(tokens[:250], torch.tensor([slot]), torch.tensor([250]), "all")
    alone = torch.cat([runtime.target_forward(t.reshape(1), torch.tensor([slot]), torch.tensor([1]), "all").logits
                       for t in tokens[250:]])
    assert runtime.cache_length(slot) == 255
    with pytest.raises(DSparkError, match="cache limit"):
        runtime.target_forward(tokens[:1], torch.tensor([slot]), torch.tensor([1]), "all")
    whole = OrtRuntime(tmp_path, num_slots=1, max_seq_len=4096)
    logits = whole.target_forward(tokens, torch.tensor([whole.allocate_slot()]), torch.tensor([255]), "all").logits
    assert torch.equal(alone, logits[250:])


def test_greedy_speculation_equals_ar_on_an_int4_engine(tmp_path):
    model, blocks = quantized_target("Q4_1", seed=3)
    drafter = tiny_drafter(model, block_size=4, seed=3)
    export_quantized(tmp_path, model, blocks, accuracy_level=4, drafter=drafter)
    prompts = [[3, 1, 2, 1, 0, 2, 3], [2, 1], [1, 3, 2, 0, 2, 3, 3, 1, 0, 0, 2]]
    params = SamplingParams(max_tokens=24)
    runtime = OrtRuntime(tmp_path, num_slots=4, max_seq_len=64)
    spec = Engine(runtime, make_scheduler("fixed", runtime.block_size)).generate(prompts, params)
    ar = Engine(OrtRuntime(tmp_path, num_slots=4, max_seq_len=64, use_drafter=False)).generate(prompts, params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in ar]
    assert sum(r.stats.draft_tokens_verified for r in spec) > 0
