"""The DSparkVerify ONNX Runtime custom op and the target graph's verification tail against the torch
reference `dspark_verify`: identical accepted counts and tokens given the same uniforms."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from conftest import tiny_drafter, tiny_target
from dspark_trt.errors import DSparkError
from dspark_trt.export.engines import export_engines
from dspark_trt.runtimes.ort_runtime import OrtRuntime
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.verify import dspark_verify
from dspark_trt_plugins import ort_op

NAMES = [name for name, _ in ort_op.INPUTS]


def _single_node_model(path, vocab: int, has_draft_probs: bool = True):
    dims = {"target_logits": ["rows", vocab], "draft_tokens": ["drafts"], "draft_probs": ["drafts", vocab],
            "row_offsets": ["offsets"], "uniforms": ["rows"]}
    inputs = [helper.make_tensor_value_info(n, t, dims.get(n, ["requests"])) for n, t in ort_op.INPUTS]
    # the node writes intermediates so that shape inference, not the declared outputs, gives their type
    node = ort_op.make_verify_node(NAMES, ["accepted_", "next_token_"], has_draft_probs=has_draft_probs)
    copies = [helper.make_node("Identity", [f"{n}_"], [n]) for n, _ in ort_op.OUTPUTS]
    outputs = [helper.make_tensor_value_info(n, t, ["requests"]) for n, t in ort_op.OUTPUTS]
    model = helper.make_model(helper.make_graph([node, *copies], "verify", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), ort_op.opset_import()])
    onnx.save(model, str(path))
    return model


def _session(path, vocab: int = 50, has_draft_probs: bool = True):
    _single_node_model(path, vocab, has_draft_probs)
    return ort_op.inference_session(path, ort_op.session_options_with_dspark_ops())


@pytest.fixture(scope="module")
def verify_session(tmp_path_factory):
    return _session(tmp_path_factory.mktemp("op") / "verify.onnx")


def _case(seed: int, greedy: bool, vocab: int = 50):
    """Random requests of 1..5 rows whose noisy drafts of the target rows are often, not always, accepted."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 6, (16,), generator=g)
    n_req, n_rows = len(counts), int(counts.sum())
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    logits = torch.randn(n_rows, vocab, generator=g) * 2
    is_last = torch.zeros(n_rows, dtype=torch.bool)
    is_last[row_offsets[1:] - 1] = True
    q = torch.softmax(logits[~is_last] + 0.7 * torch.randn(n_rows - n_req, vocab, generator=g), dim=-1)
    if greedy:
        temperature, top_k, top_p = torch.zeros(n_req), torch.zeros(n_req, dtype=torch.long), torch.ones(n_req)
        tokens = q.argmax(-1)
        q = torch.nn.functional.one_hot(tokens, vocab).float()
    else:  # T>0 with top-k and top-p, mixed with a few greedy requests
        temperature = torch.tensor([[0.0, 0.7, 1.0, 1.5][r % 4] for r in range(n_req)])
        top_k = torch.tensor([[0, 5, 0, 12, 3][r % 5] for r in range(n_req)])
        top_p = torch.tensor([[1.0, 0.9, 0.7, 1.0, 0.5, 0.8][r % 6] for r in range(n_req)])
        tokens = torch.multinomial(q, 1, generator=g).squeeze(1)
    uniforms = torch.rand(n_rows, generator=g, dtype=torch.float64)  # as the engine draws them
    return (logits, tokens, q, row_offsets, temperature, top_k, top_p, uniforms), counts


def _feeds(args):
    return {n: a.numpy().astype(np.float32 if a.is_floating_point() else np.int64) for n, a in zip(NAMES, args)}


@pytest.mark.parametrize("greedy, with_q", [(True, True), (False, True), (False, False)],
                         ids=["greedy", "sampled", "sampled-without-q"])
def test_single_node_equals_reference(verify_session, tmp_path, greedy, with_q):
    """with_q=False: has_draft_probs=0, the draft_probs tensor is ignored (random here), q = one-hot."""
    session = verify_session if with_q else _session(tmp_path / "no_q.onnx", has_draft_probs=False)
    accepted_total, rejected_total = 0, 0
    for seed in range(4):
        args, counts = _case(seed, greedy)
        feeds = _feeds(args)
        accepted, next_token = session.run(None, feeds)
        ref = dspark_verify(*args[:2], args[2] if with_q else None, *args[3:])
        assert (accepted == ref.accepted.numpy()).all() and (next_token == ref.next_token.numpy()).all()
        accepted_total += int(ref.accepted.sum())
        rejected_total += int((ref.accepted < counts - 1).sum())
    assert accepted_total > 10 and rejected_total > 10  # both paths (bonus and residual draws) were taken


def test_checker_and_shape_inference_know_the_op(tmp_path):
    model = _single_node_model(tmp_path / "v.onnx", 8)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    for name in ("accepted_", "next_token_"):
        assert types[name].elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in types[name].shape.dim] == ["requests"]  # from the temperature input
    with pytest.raises(DSparkError, match="takes 8 inputs"):
        ort_op.make_verify_node(NAMES[:7], ["a", "b"])


def test_session_without_the_library_names_the_fix(tmp_path):
    _single_node_model(tmp_path / "v.onnx", 8)
    with pytest.raises(DSparkError, match=r"DSparkVerify.*session_options_with_dspark_ops\(\)"):
        ort_op.inference_session(tmp_path / "v.onnx", ort.SessionOptions())


def test_bad_op_input_reports_the_reference_error(verify_session):
    feeds = _feeds(_case(0, greedy=False)[0])
    feeds["draft_tokens"] = feeds["draft_tokens"][1:]
    feeds["draft_probs"] = feeds["draft_probs"][1:]
    accepted, next_token = verify_session.run(None, feeds)  # an exception in the op would abort the process
    assert (accepted == ort_op.FAILED).all() and (next_token == ort_op.FAILED).all()
    with pytest.raises(DSparkError, match="DSparkVerify rejected its inputs: ValueError: .* draft tokens for"):
        ort_op.check_outputs(accepted, next_token)


@pytest.mark.parametrize("greedy", [False, True])
def test_in_graph_verification_equals_torch_over_rounds(tmp_path, greedy):
    """Draft, verify, commit, roll back for several rounds: the target graph's DSparkVerify node and
    dspark_verify on the torch runtime's logits commit the same tokens (greedy and T>0 requests; a pass of
    greedy requests only comes without q, as the engine sends it)."""
    target = tiny_target(vocab_size=6, seed=2, scale=3.0)  # a pair whose drafts get accepted
    drafter = tiny_drafter(target, block_size=4, seed=2)
    export_engines(target, drafter, tmp_path)
    ref_rt = TorchRuntime(target, drafter, num_slots=3, max_seq_len=64)
    ort_rt = OrtRuntime(tmp_path, num_slots=3, max_seq_len=64, use_drafter=False)
    assert ort_rt.verify_in_graph
    slots = torch.tensor([ref_rt.allocate_slot() for _ in range(3)])
    assert [ort_rt.allocate_slot() for _ in range(3)] == slots.tolist()
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([5, 2, 7])
    ids = torch.randint(0, 6, (int(lens.sum()),), generator=g)
    features = list(ref_rt.target_forward(ids, slots, lens, "last").taps.split(lens.tolist()))
    ort_rt.target_forward(ids, slots, lens, "last")
    sampling = ((torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3)) if greedy else
                (torch.tensor([0.0, 1.0, 0.8]), torch.tensor([0, 0, 3]), torch.tensor([1.0, 0.9, 1.0])))
    anchors, accepted_total = torch.randint(0, 6, (3,), generator=g), 0
    for ells in ([4, 4, 4], [2, 0, 3], [4, 1, 0], [3, 4, 2]):
        draft = ref_rt.draft(slots, features, anchors, *sampling, torch.rand(3, 4, generator=g, dtype=torch.float64))
        ells = torch.tensor(ells)
        rows = torch.cat([torch.cat([anchors[i: i + 1], draft.tokens[i, :e]]) for i, e in enumerate(ells)])
        d_tokens = torch.cat([draft.tokens[i, :e] for i, e in enumerate(ells)])
        d_probs = torch.cat([draft.probs[i, :e] for i, e in enumerate(ells)])
        uniforms = torch.rand(int(ells.sum()) + 3, generator=g, dtype=torch.float64)
        starts = [ref_rt.cache_length(int(s)) for s in slots]
        ref_step = ref_rt.target_forward(rows, slots, ells + 1, "all")
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), (ells + 1).cumsum(0)])
        ref = dspark_verify(ref_step.logits, d_tokens, d_probs, offsets, *sampling, uniforms)
        step, ours = ort_rt.target_verify(rows, slots, ells + 1, d_tokens, d_probs[:0] if greedy else d_probs,
                                          *sampling, uniforms)
        assert torch.equal(ours.accepted, ref.accepted) and torch.equal(ours.next_token, ref.next_token)
        assert torch.equal(step.logits.argmax(-1), ref_step.logits.argmax(-1))
        accepted_total += int(ref.accepted.sum())
        features = []
        for i, s in enumerate(slots.tolist()):  # commit: keep the anchor and the accepted drafts
            keep = starts[i] + int(ref.accepted[i]) + 1
            ref_rt.rollback(s, keep)
            ort_rt.rollback(s, keep)
            features.append(ref_step.taps[int(offsets[i]): int(offsets[i]) + int(ref.accepted[i]) + 1])
        anchors = ref.next_token
    assert accepted_total > 0


def test_the_op_loads_without_transformers():
    """onnxruntime_extensions' package imports its converters (transformers, seconds per Triton model
    process); ort_op keeps them out and a later import of them still gets the real module."""
    import subprocess
    import sys

    code = ("import sys, dspark_trt_plugins.ort_op as op\n"
            "assert op.onnx_op is not None and 'transformers' not in sys.modules\n"
            "import onnxruntime_extensions.cvt as cvt\n"
            "assert hasattr(cvt, 'convert_tokenizer') and 'transformers' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
