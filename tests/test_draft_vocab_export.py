"""A drafter with a reduced draft vocabulary through the exported draft graph, its quantized flavours and an
engine directory's build-time validation: target-id tokens and full-vocabulary q, as the torch drafter."""
import onnx
import pytest
import torch

from dspark_trt.export.weight_quant import all_graphs
from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter

from test_cli_spec import pair  # noqa: F401  (the tiny Qwen3 target + tokenizer directory)
from test_export_draft import PROBS_TOL, SAMPLING, TOL, WIDE, _runtime, _wide_target

VOCAB, DRAFT_VOCAB, BLOCK = 2048, 512, 4


def _draft_ids(n: int, seed: int = 0) -> torch.Tensor:
    """n random target ids, ascending."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def _reduced_drafter(target, draft_ids: torch.Tensor, **overrides):
    cfg = dict(block_size=BLOCK, num_draft_layers=1, target_layer_ids=[0, 1], markov_rank=32,
               mask_token_id=VOCAB - 1, draft_vocab_size=len(draft_ids)) | overrides
    drafter = random_drafter(drafter_config_for_target(target.config, **cfg), seed=2, target=target,
                             draft_ids=draft_ids)
    g = torch.Generator().manual_seed(3)
    head = drafter.markov_head
    with torch.no_grad():  # a draft distribution neither uniform nor one-hot, that the previous token moves
        for weight, scale in ((drafter.lm_head.weight, 0.3), (head.markov_w1.weight, 1.0),
                              (head.markov_w2.weight, 0.3)):
            weight.copy_(torch.randn(weight.shape, generator=g) * scale)
    return drafter


def _assert_in_draft_vocab(tokens, probs, draft_ids, vocab: int = VOCAB):
    """Tokens are target ids of the draft vocabulary; q is a distribution over it, zero elsewhere."""
    inside = torch.zeros(vocab, dtype=torch.bool)
    inside[draft_ids] = True
    assert inside[tokens].all()
    assert probs.shape[-1] == vocab
    assert (probs[..., ~inside] == 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert (probs.gather(-1, tokens[..., None]) > 0).all()


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_reduced_vocabulary_graph_equals_torch(head, tmp_path):
    """Two rounds (the second over a cached context), each drafted greedy, at temperature only, with mixed greedy /
    top-k / top-p rows and with top-k and top-p: the graph's target-id tokens and full-vocabulary q equal torch's."""
    draft_ids = _draft_ids(DRAFT_VOCAB)
    drafter = _reduced_drafter(_wide_target(), draft_ids, markov_head_type=head)
    rt = _runtime(drafter, tmp_path)
    assert rt.config.draft_vocab_size == DRAFT_VOCAB
    slots = [2, 0, 3]
    states = [drafter.new_state() for _ in slots]
    g = torch.Generator().manual_seed(0)
    outside_anchor = int(torch.nonzero(~torch.isin(torch.arange(VOCAB), draft_ids))[0])
    for n_new in ([5, 2, 0], [1, 3, 2]):
        new = [torch.randn(n, 2 * WIDE, generator=g) for n in n_new]
        for name, (t, k, p) in SAMPLING.items():
            t, k, p = torch.tensor(t), torch.tensor(k), torch.tensor(p)
            uniforms = torch.rand(3, BLOCK, generator=g, dtype=torch.float64)
            anchors = torch.tensor([outside_anchor, *torch.randint(0, VOCAB, (2,), generator=g).tolist()])
            ref = drafter.draft_batch(states, new, anchors, t, k, p, uniforms)
            ours = rt.draft(torch.tensor(slots), [f if f.shape[0] else None for f in new], anchors, t, k, p, uniforms)
            new = [f[:0] for f in new]
            assert torch.equal(ours.tokens, ref.tokens), name
            assert ours.probs.shape == (3, BLOCK, 0 if name == "greedy" else VOCAB)  # greedy: q left out
            q = ours.full_probs(VOCAB)
            assert ref.probs.shape == q.shape == (3, BLOCK, VOCAB)
            assert (q - ref.probs).abs().max() < PROBS_TOL, name
            assert (ours.confidence_logits - ref.confidence_logits).abs().max() < TOL, name
            _assert_in_draft_vocab(ours.tokens, q, draft_ids)
            if name == "top_k_top_p":
                support = (q > 0).sum(-1)
                assert (support[0] <= 3).all() and (support[1] <= 5).all() and (support < DRAFT_VOCAB).all()


def test_reduced_vocabulary_on_smollm2(smollm2, tmp_path):
    """A drafter for SmolLM2 over 512 of its 49,152 tokens (the LM head's rows taken from the target): the graph
    drafts what torch drafts, greedy and sampled, with q over SmolLM2's whole vocabulary."""
    model, _ = smollm2
    vocab = model.config.vocab_size
    draft_ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:DRAFT_VOCAB].sort().values
    cfg = drafter_config_for_target(model.config, block_size=BLOCK, num_draft_layers=1, markov_rank=32,
                                    draft_vocab_size=DRAFT_VOCAB)
    drafter = random_drafter(cfg, seed=0, target=model, draft_ids=draft_ids)
    rt = _runtime(drafter, tmp_path)
    states = [drafter.new_state() for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    new = [torch.randn(5, cfg.num_taps * cfg.hidden_size, generator=g) for _ in range(3)]
    for name, (t, k, p) in SAMPLING.items():
        t, k, p = torch.tensor(t), torch.tensor(k), torch.tensor(p)
        uniforms = torch.rand(3, BLOCK, generator=g, dtype=torch.float64)
        anchors = torch.randint(0, vocab, (3,), generator=g)
        ref = drafter.draft_batch(states, new, anchors, t, k, p, uniforms)
        ours = rt.draft(torch.arange(3), new, anchors, t, k, p, uniforms)
        new = [f[:0] for f in new]
        assert torch.equal(ours.tokens, ref.tokens), name
        assert (ours.full_probs(vocab) - ref.probs).abs().max() < PROBS_TOL, name
        _assert_in_draft_vocab(ours.tokens, ours.full_probs(vocab), draft_ids, vocab)


@pytest.mark.parametrize("weights, op, min_agreement", [("int8", "MatMulIntegerToFloat", 0.9),
                                                        ("int4", "MatMulNBits", 0.6)])
def test_reduced_vocabulary_quantized_weights(weights, op, min_agreement, tmp_path):
    """The LM head [N, H] is quantized at its draft-vocabulary width (the Markov head's W2 [N, r] stays float32:
    r is shallower than MIN_DEPTH); the graph's first greedy tokens mostly agree with the fp32 graph's (later
    ones follow a diverged chain), and every token is a target id drawn from a proper full-vocabulary q."""
    draft_ids = _draft_ids(1536, seed=1)  # H x N = WIDE x 1536: above the quantizer's size threshold
    drafter = _reduced_drafter(_wide_target(), draft_ids, markov_rank=64)
    fp32 = _runtime(drafter, tmp_path / "fp32", num_slots=8)
    quant = _runtime(drafter, tmp_path / weights, weights=weights, num_slots=8)
    model = onnx.load(str(tmp_path / weights / "draft.onnx"))
    sizes = {i.name: list(i.dims) for i in model.graph.initializer}
    quantized = [sizes[n.input[1]] for graph in all_graphs(model.graph) for n in graph.node if n.op_type == op]
    columns = [s[0] if weights == "int4" else s[-1] for s in quantized]  # MatMulNBits: [N, ...]; int8: [K, N]
    assert columns.count(1536) == 1  # the LM head
    floats = [sizes.get(n.input[1]) for graph in all_graphs(model.graph) for n in graph.node if n.op_type == "MatMul"]
    assert floats.count([64, 1536]) == BLOCK  # W2 at every block position
    g = torch.Generator().manual_seed(0)
    slots = torch.arange(8)
    new = [torch.randn(6, 2 * WIDE, generator=g) for _ in slots]
    anchors = torch.randint(0, VOCAB, (8,), generator=g)
    greedy = (torch.zeros(8), torch.zeros(8, dtype=torch.long), torch.ones(8))
    a, b = fp32.draft(slots, new, anchors, *greedy, None), quant.draft(slots, new, anchors, *greedy, None)
    assert (a.tokens[:, 0] == b.tokens[:, 0]).float().mean() >= min_agreement
    _assert_in_draft_vocab(b.tokens, b.full_probs(VOCAB), draft_ids)
    t, k, p = torch.full((8,), 0.9), torch.tensor([0, 20] * 4), torch.tensor([0.9, 1.0] * 4)
    s = quant.draft(slots, [None] * 8, anchors, t, k, p, torch.rand(8, BLOCK, generator=g, dtype=torch.float64))
    _assert_in_draft_vocab(s.tokens, s.probs, draft_ids)
    assert ((s.probs > 0).sum(-1)[1::2] <= 20).all()


def test_engine_with_a_reduced_vocabulary_passes_validation(tmp_path):
    """export_engines records the draft vocabulary and the build-time validation passes; the same engines
    validated against a drafter with another draft vocabulary fail it."""
    from dspark_trt.build.validate import failures, validate_engines
    from dspark_trt.export.engines import export_engines
    from dspark_trt.graphs.manifest import read_manifest

    target = _wide_target()
    drafter = _reduced_drafter(target, _draft_ids(DRAFT_VOCAB))
    export_engines(target, drafter, tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["draft"]["draft_vocab_size"] == manifest["draft"]["config"]["draft_vocab_size"] == DRAFT_VOCAB
    probs = manifest["graphs"]["draft"]["outputs"][1]
    assert probs["name"] == "probs" and probs["shape"][2] == "vocab"  # V, or 0 on a greedy pass
    report = validate_engines(tmp_path, target, drafter)
    assert failures(report, 1e-3) == []
    assert report["draft_tokens_identical"] is True and report["draft:probs"]["max_abs_error"] < PROBS_TOL
    with torch.no_grad():
        drafter.set_draft_vocab(_draft_ids(DRAFT_VOCAB, seed=5))
    assert any("graph 'draft'" in problem for problem in failures(validate_engines(tmp_path, target, drafter), 1e-3))


def test_full_vocabulary_manifest_has_no_draft_vocab_size(tmp_path):
    from dspark_trt.export.engines import export_engines

    target = _wide_target()
    cfg = drafter_config_for_target(target.config, block_size=BLOCK, num_draft_layers=1, target_layer_ids=[0, 1],
                                    markov_rank=4, mask_token_id=VOCAB - 1)
    manifest = export_engines(target, random_drafter(cfg), tmp_path)
    assert "draft_vocab_size" not in manifest["draft"]


def test_tensorrt_flavour_validation_with_a_reduced_vocabulary(tmp_path):
    """build-engines --backend tensorrt compiles the same draft graph: the TensorRT-flavour engine directory
    with a reduced-vocabulary drafter passes its validation (validate_trt_engines) and records the vocabulary."""
    from conftest import tiny_drafter
    from dspark_trt.build.validate import failures
    from dspark_trt.build.validate_trt import validate_trt_engines
    from test_fused_target import quantized_target
    from test_trt_target import _export

    model, blocks = quantized_target("Q4_1", seed=6)
    drafter = tiny_drafter(model, block_size=3, seed=6, draft_ids=list(range(1, 40, 3)))
    manifest = _export(tmp_path, model, blocks, drafter=drafter)
    assert manifest["draft"]["draft_vocab_size"] == 13
    report = validate_trt_engines(tmp_path, model, drafter)
    assert failures(report, 1e-3) == [], report
    assert report["draft_tokens_identical"] is True


def test_build_engines_takes_a_reduced_vocabulary_checkpoint(pair, tmp_path):  # noqa: F811
    """build-engines --draft DIR with a saved reduced-vocabulary drafter (its lm_head the target's rows, shared):
    loaded, exported, validated exactly against torch, the vocabulary recorded in the manifest."""
    from dspark_trt.build.pipeline import BuildOptions, build_engines
    from dspark_trt.models.drafter_checkpoint import save_drafter
    from dspark_trt.models.weights import load_target

    target, _ = load_target(str(pair / "target"))
    cfg = drafter_config_for_target(target.config, block_size=4, num_draft_layers=1, target_layer_ids=[0, 1],
                                    markov_rank=4, mask_token_id=11, draft_vocab_size=6)
    save_drafter(random_drafter(cfg, seed=3, target=target, draft_ids=torch.tensor([1, 2, 5, 6, 8, 10])),
                 tmp_path / "draft", share_target_embeddings=True)
    manifest = build_engines(BuildOptions(out=str(tmp_path / "engines"), target=str(pair / "target"),
                                          draft=str(tmp_path / "draft"), draft_weights="fp32"), progress=lambda m: None)
    assert manifest["draft"]["draft_vocab_size"] == 6
    results = manifest["validation"]["results"]
    assert results["draft_tokens_identical"] is True and results["draft:probs"]["max_abs_error"] < PROBS_TOL
