"""A reduced draft vocabulary (EAGLE-3's d2t/t2d convention): the drafter draws from its subset exactly as a
full-vocabulary drafter whose logits are -inf outside it, and the checkpoint round-trips the mapping."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dspark_trt import load_drafter
from dspark_trt.errors import UnsupportedModelError
from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter, save_drafter

from conftest import tiny_drafter, tiny_target

DRAFT_IDS = [0, 3, 4, 7, 9, 10, 13]


def _pair(seed=0):
    """A full-vocabulary drafter and the reduced one that shares its weights on DRAFT_IDS."""
    target = tiny_target(vocab_size=16, seed=seed)
    full = tiny_drafter(target, block_size=4, seed=seed)
    reduced = tiny_drafter(target, block_size=4, seed=seed, draft_ids=DRAFT_IDS)
    state = {k: v for k, v in full.state_dict().items()}
    ids = torch.tensor(DRAFT_IDS)
    state["lm_head.weight"] = state["lm_head.weight"][ids]
    state["markov_head.markov_w2.weight"] = state["markov_head.markov_w2.weight"][ids]
    state.update(d2t=reduced.d2t, t2d=reduced.t2d)
    reduced.load_state_dict(state)
    return full, reduced


def _draft(drafter, temperature, seed):
    torch.manual_seed(seed)
    ctx = torch.randn(5, drafter.fc.in_features)
    gen = torch.Generator().manual_seed(seed)
    return drafter.draft(drafter.new_state(), ctx, anchor_id=5, temperature=temperature, generator=gen)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_reduced_drafter_equals_full_drafter_masked_outside_its_vocabulary(temperature):
    full, reduced = _pair()
    outside = torch.ones(16, dtype=torch.bool)
    outside[DRAFT_IDS] = False
    bias = torch.zeros(16)
    bias[outside] = float("-inf")  # the reduced drafter's semantics on the full one
    full.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    for seed in range(4):
        ours, ref = _draft(reduced, temperature, seed), _draft(full, temperature, seed)
        assert torch.equal(ours.tokens, ref.tokens)
        assert set(ours.tokens.tolist()) <= set(DRAFT_IDS)
        torch.testing.assert_close(ours.probs, ref.probs)  # full-vocabulary q, zero outside
        assert float(ours.probs[:, outside].abs().sum()) == 0.0
        torch.testing.assert_close(ours.logits, ref.logits[:, DRAFT_IDS])


def test_to_draft_ids_maps_inside_and_marks_outside():
    _, reduced = _pair()
    ids = torch.arange(16)
    mapped = reduced.to_draft_ids(ids)
    assert mapped[DRAFT_IDS].tolist() == list(range(len(DRAFT_IDS)))
    assert set(mapped[[i for i in range(16) if i not in DRAFT_IDS]].tolist()) == {-1}
    assert torch.equal(reduced.draft_ids, torch.tensor(DRAFT_IDS))


def test_checkpoint_round_trip_keeps_the_mapping_exact_in_bfloat16(tmp_path):
    target = tiny_target(vocab_size=16)
    _, reduced = _pair()
    save_drafter(reduced, tmp_path, dtype=torch.bfloat16, share_target_embeddings=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["draft_vocab_size"] == len(DRAFT_IDS) and raw["vocab_size"] == 16
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert (torch.arange(len(DRAFT_IDS)) + tensors["d2t"]).tolist() == DRAFT_IDS
    assert int(tensors["t2d"].sum()) == len(DRAFT_IDS) and "lm_head.weight" not in tensors
    loaded = load_drafter(tmp_path, target=target)
    assert torch.equal(loaded.draft_ids, torch.tensor(DRAFT_IDS))
    # the LM head is the target's rows of the draft vocabulary
    assert torch.equal(loaded.lm_head.weight, target.lm_head.weight[DRAFT_IDS])


def test_full_vocabulary_checkpoints_have_no_mapping(tmp_path):
    target = tiny_target(vocab_size=16)
    save_drafter(tiny_drafter(target, block_size=4), tmp_path)
    assert "draft_vocab_size" not in json.loads((tmp_path / "config.json").read_text())
    assert not {"d2t", "t2d"} & set(load_file(tmp_path / "model.safetensors"))
    assert load_drafter(tmp_path).draft_ids is None


def test_a_config_with_a_draft_vocabulary_needs_the_mapping(tmp_path):
    _, reduced = _pair()
    save_drafter(reduced, tmp_path)
    from safetensors.torch import save_file
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["d2t"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="lacks tensor 'd2t'"):
        load_drafter(tmp_path)


def test_draft_vocabulary_must_be_ascending_distinct_ids():
    cfg = drafter_config_for_target(tiny_target(vocab_size=16).config, block_size=2, target_layer_ids=[0, 1],
                                    markov_rank=4, mask_token_id=15, draft_vocab_size=3)
    with pytest.raises(ValueError, match="ascending distinct"):
        random_drafter(cfg, draft_ids=torch.tensor([4, 2, 9]))
    with pytest.raises(ValueError, match="needs its draft_ids"):
        random_drafter(cfg)


def test_loss_over_the_draft_vocabulary_equals_the_full_loss_of_the_masked_drafter():
    """With the target's full logsumexp, the L1 term counts the target's mass outside the subset: the loss of
    the reduced logits equals the full-vocabulary loss of logits that are -inf outside (CE where labels are
    inside; EAGLE-3 masks the others)."""
    from dspark_trt.training.losses import dspark_loss

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(DRAFT_IDS)
    full_logits = torch.randn(3, 4, 16, generator=g)
    target_logits = torch.randn(3, 4, 16, generator=g) * 2
    labels = ids[torch.randint(0, len(DRAFT_IDS), (3, 4), generator=g)]
    weights = torch.rand(3, 4, generator=g)
    conf = torch.randn(3, 4, generator=g)
    masked = torch.full_like(full_logits, float("-inf"))
    masked[..., ids] = full_logits[..., ids]
    ref, ref_stats = dspark_loss(masked, target_logits, labels, conf, weights)
    index = torch.cumsum(torch.isin(torch.arange(16), ids).long(), 0) - 1
    ours, stats = dspark_loss(full_logits[..., ids], target_logits[..., ids], index[labels], conf, weights,
                              target_lse=torch.logsumexp(target_logits, -1))
    torch.testing.assert_close(ours, ref)
    assert stats["tv"] == pytest.approx(ref_stats["tv"]) and stats["tv"] > 0
    # a label outside the draft vocabulary adds no cross-entropy
    draft_labels = index[labels]
    draft_labels[0, 0] = -1
    _, with_outside = dspark_loss(full_logits[..., ids], target_logits[..., ids], draft_labels, conf, weights,
                                  target_lse=torch.logsumexp(target_logits, -1))
    ce00 = -torch.log_softmax(full_logits[0, 0, ids], -1)[index[labels[0, 0]]]
    assert with_outside["ce"] == pytest.approx(stats["ce"] - float(weights[0, 0] * ce00 / weights.sum()))


def test_init_from_a_full_drafter_cuts_its_output_rows_to_the_draft_vocabulary():
    from dspark_trt.models.drafter_checkpoint import init_from

    full, _ = _pair()
    target = tiny_target(vocab_size=16)
    fresh = tiny_drafter(target, block_size=4, seed=9, draft_ids=DRAFT_IDS)
    init_from(fresh, full)
    _, reference = _pair()  # the reduced drafter built from the full one's rows by hand
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(UnsupportedModelError, match="'layers.0.mlp.*has shape"):
        init_from(tiny_drafter(target, block_size=4, intermediate_size=12), full)
    # a token the initial drafter does not predict keeps the fresh rows (the target's LM head row)
    other = tiny_drafter(target, block_size=4, seed=9, draft_ids=[1, 2, 3])  # 3 is the reference's row 1
    fresh_rows = {k: other.state_dict()[k].clone() for k in ("lm_head.weight", "markov_head.markov_w2.weight")}
    init_from(other, reference)
    for key, rows in fresh_rows.items():
        got, theirs = other.state_dict()[key], reference.state_dict()[key]
        assert torch.equal(got[:2], rows[:2]) and torch.equal(got[2], theirs[1]), key
    assert torch.equal(other.state_dict()["fc.weight"], reference.state_dict()["fc.weight"])


def test_a_drafter_grown_from_fewer_layers_drafts_what_its_source_did_and_trains_its_new_layers():
    from dspark_trt.models.drafter_checkpoint import init_from

    _, source = _pair()
    target = tiny_target(vocab_size=16)
    grown = tiny_drafter(target, block_size=4, seed=9, draft_ids=DRAFT_IDS, num_draft_layers=3)
    init_from(grown, source)
    for key, value in source.state_dict().items():
        assert torch.equal(grown.state_dict()[key], value), key
    mine, theirs = _draft(grown, 0.8, seed=3), _draft(source, 0.8, seed=3)
    assert torch.equal(mine.tokens, theirs.tokens)
    torch.testing.assert_close(mine.logits, theirs.logits)
    torch.testing.assert_close(mine.confidence_logits, theirs.confidence_logits)
    # the new layers are not dead: their residual writes get gradients, so training moves them
    kv = grown.context_kv(torch.randn(5, grown.fc.in_features), torch.arange(5))
    hidden, _ = grown.backbone(torch.tensor([[5, 15, 15, 15]]), torch.arange(5, 9), [[layer_kv] for layer_kv in kv])
    hidden.square().sum().backward()
    for weight in (grown.layers[2].mlp.down_proj.weight, grown.layers[2].self_attn.o_proj.weight):
        assert float(weight.grad.abs().sum()) > 0
    with pytest.raises(UnsupportedModelError, match="has 3 layers; this drafter has 1"):
        init_from(tiny_drafter(target, block_size=4, draft_ids=DRAFT_IDS), grown)


def test_kl_warm_start_replaces_the_l1_term_and_reaches_zero_at_the_target():
    from dspark_trt.training.losses import LossWeights, dspark_loss

    g = torch.Generator().manual_seed(1)
    target_logits = torch.randn(2, 3, 8, generator=g)
    labels, weights = torch.randint(0, 8, (2, 3), generator=g), torch.ones(2, 3)
    at_target, stats = dspark_loss(target_logits, target_logits, labels, None, weights, LossWeights(ce=0.0, kl=True))
    assert float(at_target) == pytest.approx(0.0, abs=1e-6) and "kl" in stats
    away, _ = dspark_loss(torch.zeros_like(target_logits), target_logits, labels, None, weights,
                          LossWeights(ce=0.0, kl=True))
    expected = torch.nn.functional.kl_div(torch.log_softmax(torch.zeros(8), -1).expand(2, 3, 8),
                                          torch.log_softmax(target_logits, -1), log_target=True,
                                          reduction="none").sum(-1).mean()
    assert float(away) == pytest.approx(LossWeights().tv * float(expected), rel=1e-5)  # in the L1 term's place
