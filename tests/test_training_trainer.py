"""Training semantics: the packed teacher-forced forward equals inference drafting on the same inputs,
the loss terms are the spec's, the schedule is warmup + cosine, and resuming is exact."""
import math

import pytest
import torch
import torch.nn.functional as F

from dspark_trt.errors import DSparkError
from dspark_trt.models.drafter_checkpoint import load_drafter
from dspark_trt.training.data import FeatureExtractor, Sample
from dspark_trt.training.losses import LossWeights, dspark_loss, position_weights
from dspark_trt.training.trainer import Trainer, TrainConfig, lr_factor

from conftest import tiny_drafter, tiny_target


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn", None])
def test_packed_training_forward_equals_inference_drafting(head):
    """Same weights and context, greedy drafts fed back as the teacher-forced previous tokens:
    every block's corrected logits, base logits and confidences equal draft_batch's."""
    target = tiny_target(vocab_size=12, seed=1, num_layers=3)
    overrides = {"markov_head_type": head} if head else {"markov_rank": 0, "confidence_head_with_markov": False}
    if head:
        drafter = tiny_drafter(target, block_size=4, seed=2, **overrides)
    else:
        from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter

        drafter = random_drafter(drafter_config_for_target(target.config, block_size=4, num_draft_layers=2,
                                                           target_layer_ids=[0, 1], mask_token_id=11, **overrides))
    for p in drafter.parameters():  # make the Markov/gate/RNN terms matter
        p.data.add_(torch.randn_like(p) * 0.3)
    seqs = [torch.tensor([1, 5, 2, 7, 3, 3, 9, 4]), torch.tensor([6, 2, 8, 1, 0, 5])]
    extractor = FeatureExtractor(target, [0, 1], max_batch=2, max_length=16)
    feats = extractor([Sample(s, torch.ones_like(s, dtype=torch.bool)) for s in seqs])
    anchors = [(0, 0), (0, 3), (0, 7), (1, 1), (1, 4)]  # (sequence, anchor position); position 0 = no context
    expected = []
    for seq, p in anchors:
        ctx = feats.taps[(feats.seq == seq) & (feats.positions < p)]
        out = drafter.draft_batch([drafter.new_state()], [ctx], seqs[seq][p: p + 1], torch.zeros(1),
                                  torch.zeros(1, dtype=torch.long), torch.ones(1), None)
        expected.append(out)
    anchor_ids = torch.tensor([int(seqs[s][p]) for s, p in anchors])
    prev = torch.stack([torch.cat([anchor_ids[i: i + 1], e.tokens[0, :-1]]) for i, e in enumerate(expected)])
    logits, base, conf = drafter.forward_packed(
        feats.taps, feats.positions, feats.seq, anchor_ids, torch.tensor([p for _, p in anchors]),
        torch.tensor([s for s, _ in anchors]), prev)
    torch.testing.assert_close(base, torch.cat([e.base_logits for e in expected]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, torch.cat([e.logits for e in expected]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conf, torch.cat([e.confidence_logits for e in expected]), atol=1e-5, rtol=1e-5)


def test_losses_are_the_spec_terms():
    torch.manual_seed(0)
    a, b, v = 3, 4, 6
    logits, target, conf = torch.randn(a, b, v), torch.randn(a, b, v), torch.randn(a, b)
    labels = torch.randint(0, v, (a, b))
    weights = position_weights(b).expand(a, b).clone()
    weights[1, 2:] = 0
    total, stats = dspark_loss(logits, target, labels, conf, weights)
    # independent per-slot computation in float64
    ce = tv = bce = denom = 0.0
    tau = []
    for i in range(a):
        surv, t = 1.0, 1.0
        for k in range(b):
            w = float(weights[i, k])
            p = logits[i, k].double().softmax(-1)
            q = target[i, k].double().softmax(-1)
            l1 = float((p - q).abs().sum())
            c = min(1.0, max(0.0, 1 - l1 / 2))
            s = float(conf[i, k])
            ce += w * -math.log(float(p[labels[i, k]]))
            tv += w * l1
            bce += w * -(c * math.log(1 / (1 + math.exp(-s))) + (1 - c) * math.log(1 - 1 / (1 + math.exp(-s))))
            denom += w
            if w > 0:
                surv *= c
                t += surv
        tau.append(t)
    assert stats["ce"] == pytest.approx(ce / denom, rel=1e-5)
    assert stats["tv"] == pytest.approx(tv / denom, rel=1e-5)
    assert stats["conf"] == pytest.approx(bce / denom, rel=1e-5)
    assert float(total) == pytest.approx(0.1 * ce / denom + 0.9 * tv / denom + bce / denom, rel=1e-5)
    assert stats["tau_probabilistic"] == pytest.approx(sum(tau) / a, rel=1e-5)
    # DFlash weights: pure cross-entropy
    total, _ = dspark_loss(logits, target, labels, None, weights, LossWeights(ce=1.0, tv=0.0, conf=0.0))
    assert float(total) == pytest.approx(ce / denom, rel=1e-5)


def test_position_weights_and_lr_schedule():
    torch.testing.assert_close(position_weights(7), torch.tensor(
        [1.0000, 0.7788, 0.6065, 0.4724, 0.3679, 0.2865, 0.2231]), atol=1e-4, rtol=0)
    total = 100
    factors = [lr_factor(s, total, 0.04) for s in range(total)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # 4 warmup steps
    assert all(x >= y for x, y in zip(factors[3:], factors[4:]))  # then non-increasing
    assert factors[-1] < 0.001 and factors[52] == pytest.approx(0.5, abs=0.02)


def _setup(tmp_path, steps):
    target = tiny_target(vocab_size=12, seed=7, num_layers=3)
    drafter = tiny_drafter(target, block_size=3, seed=3)
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (10, 14, 9, 12):
        ids = torch.randint(0, 11, (n,), generator=g)
        mask = torch.arange(n) >= 3
        samples.append(Sample(ids, mask))
    extractor = FeatureExtractor(target, [0, 1], max_batch=2, max_length=16)
    config = TrainConfig(steps=steps, lr=3e-3, batch_size=2, num_anchors=4, checkpoint_every=3)
    return Trainer(drafter, extractor, samples, config, tmp_path)


def test_resume_continues_exactly(tmp_path):
    straight = _setup(tmp_path / "a", 6)
    straight.train(progress=False)
    _setup(tmp_path / "b", 6).train(progress=False, until=3)
    resumed = _setup(tmp_path / "b", 6)
    assert resumed.restore() and resumed.step == 3
    resumed.train(progress=False)
    a, b = load_drafter(tmp_path / "a"), load_drafter(tmp_path / "b")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(a.fc.weight, _setup(tmp_path / "c", 6).drafter.fc.weight)  # it did train
    # frozen copies of the target's tables stay put
    assert torch.equal(a.lm_head.weight, _setup(tmp_path / "d", 6).drafter.lm_head.weight)


def test_kl_warm_start_covers_the_first_steps_then_the_l1_term_takes_over(tmp_path):
    trainer = _setup(tmp_path, 4)
    trainer.config.kl_warmup_frac = 0.5
    records = trainer.train(progress=False)
    assert ["kl" in r for r in records] == [True, True, False, False]


def test_a_checkpoint_from_before_a_new_setting_resumes_with_its_default(tmp_path):
    _setup(tmp_path, 4).train(progress=False, until=2)
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=False)
    del state["config"]["kl_warmup_frac"], state["config"]["loss"]["kl"]  # written before these existed
    torch.save(state, tmp_path / "trainer_state.pt")
    resumed = _setup(tmp_path, 4)
    assert resumed.restore() and resumed.step == 2


def test_milestones_keep_a_loadable_drafter_of_every_nth_step(tmp_path):
    trainer = _setup(tmp_path, 4)
    trainer.config.milestone_every = 2
    trainer.train(progress=False)
    kept = sorted(p.name for p in (tmp_path / "milestones").iterdir())
    assert kept == ["step-000002", "step-000004"]
    final = load_drafter(tmp_path)
    last = load_drafter(tmp_path / "milestones" / "step-000004", target=trainer.extractor.target)
    for key, value in final.state_dict().items():  # the milestone is the final drafter in bfloat16
        if key in ("embed_tokens.weight", "lm_head.weight"):
            continue  # not stored: taken from the target at load
        torch.testing.assert_close(last.state_dict()[key], value, atol=2e-2, rtol=1e-2, msg=key)


def test_validation_scores_held_out_sequences_the_same_way_each_time(tmp_path):
    trainer = _setup(tmp_path, 6)
    trainer.held_out = trainer.samples[:2]  # seen in training here, so that training moves the score
    before = trainer.validate()
    assert before == trainer.validate()  # same anchors, same weights: same value
    trainer.config.validate_every = 3
    records = trainer.train(progress=False)
    assert ["val_tau" in r for r in records] == [False, False, True, False, False, True]
    assert records[-1]["val_tau"] == trainer.validate() != before


def test_a_reduced_vocabulary_drafter_needs_the_targets_lm_head_rows(tmp_path):
    trainer = _setup(tmp_path, 2)
    target = trainer.extractor.target
    ids = torch.tensor([0, 2, 3, 5, 8])
    reduced = tiny_drafter(target, block_size=3, seed=3, draft_ids=ids.tolist())  # a random LM head
    trainer = Trainer(reduced, trainer.extractor, trainer.samples, trainer.config, tmp_path / "r")
    with pytest.raises(DSparkError, match="LM head is not the target's"):
        trainer.train(progress=False)
    with torch.no_grad():
        reduced.lm_head.weight.copy_(target.lm_head.weight[ids])
    records = Trainer(reduced, trainer.extractor, trainer.samples, trainer.config, tmp_path / "r2").train(progress=False)
    assert all(0 <= r["tv"] <= 2 for r in records)  # the L1 distance of two distributions


def test_bfloat16_autocast_computes_the_same_loss_and_gradients_to_its_precision(tmp_path):
    grads, losses = {}, {}
    for precision in ("fp32", "bf16"):
        trainer = _setup(tmp_path / precision, 1)
        trainer.config.precision = precision
        loss, _ = trainer.loss_for(trainer.batch_for(0), torch.Generator().manual_seed(0))
        loss.backward()
        losses[precision] = loss.item()
        grads[precision] = torch.cat([p.grad.flatten() for p in trainer.drafter.parameters() if p.grad is not None])
        assert all(p.dtype == torch.float32 for p in trainer.drafter.parameters())  # the weights stay float32
    assert losses["bf16"] != losses["fp32"]  # the forward really ran in bfloat16 ...
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)  # ... to the same loss
    assert F.cosine_similarity(grads["bf16"], grads["fp32"], dim=0) > 0.99  # and the same descent direction


def test_an_unknown_precision_is_refused(tmp_path):
    trainer = _setup(tmp_path, 1)
    with pytest.raises(DSparkError, match="unknown precision 'fp8'"):
        Trainer(trainer.drafter, trainer.extractor, trainer.samples, TrainConfig(precision="fp8"), tmp_path)
