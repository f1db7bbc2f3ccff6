"""Metrics on hand-computed rounds, and STS recovering a known over-confidence."""
import json
import math

import pytest
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.spec.calibration import Calibration, apply_sts, fit_sts, load_calibration, save_calibration
from dspark_trt.spec.metrics import (
    accepted_length,
    auc,
    brier,
    calibration_metrics,
    conditional_acceptance,
    ece,
    prefix_survival,
    summarize,
    verify_rate,
)

# four rounds, γ = 3: the last one proposed 2 drafts and accepted both, the second being EOS
ACC = torch.tensor([3, 1, 0, 2])
LEN = torch.tensor([3, 3, 3, 2])
EOS = torch.tensor([False, False, False, True])


def test_accepted_length_counts_the_bonus_except_after_eos():
    # τ = 3+1, 1+1, 0+1, 2 (EOS: no bonus) = 9 over 4 rounds
    assert accepted_length(ACC, EOS) == pytest.approx(2.25)
    # verify_rate = Σ τ / (Σ proposal_len + rounds) = 9 / (11 + 4)
    assert verify_rate(ACC, LEN, EOS) == pytest.approx(0.6)


def test_prefix_survival_and_conditional_acceptance():
    # survival@k = #(acc > k) / #(len > k): 3/4, 2/4, 1/3
    assert prefix_survival(ACC, LEN, 3).tolist() == pytest.approx([0.75, 0.5, 1 / 3])
    # conditional@k = #(acc > k, len > k) / #(acc >= k, len > k):
    # k=0: 3/4; k=1: rounds 0,3 of 0,1,3 -> 2/3; k=2: only round 0 reached it (round 3 proposed 2) -> 1/1
    assert conditional_acceptance(ACC, LEN, 3).tolist() == pytest.approx([0.75, 2 / 3, 1.0])


def test_conditional_acceptance_is_the_papers_ratio_for_fixed_lengths():
    acc = torch.tensor([0, 1, 1, 2, 3, 3, 3, 1])
    fixed = torch.full_like(acc, 3)
    n_gt = [(acc > k).sum().item() for k in range(-1, 3)]  # #acc > k-1 with #acc > -1 = #rounds
    expected = [n_gt[k + 1] / n_gt[k] for k in range(3)]
    assert conditional_acceptance(acc, fixed, 3).tolist() == pytest.approx(expected)


def test_ece_auc_brier_hand_computed():
    p = torch.tensor([0.1, 0.12, 0.9, 0.6])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    # 20 bins: {0.1, 0.12} in bin 2 (mean p 0.11, mean y 0.5), 0.9 in bin 18, 0.6 in bin 12
    # ECE = 2/4·0.39 + 1/4·0.1 + 1/4·0.6 = 0.37
    assert float(ece(p, y)) == pytest.approx(0.37)
    # AUC: positive/negative pairs (0.12>0.1), (0.12<0.6), (0.9>0.1), (0.9>0.6) -> 3/4
    assert auc(p, y) == pytest.approx(0.75)
    # Brier = (0.01 + 0.7744 + 0.01 + 0.36) / 4
    assert brier(p, y) == pytest.approx(0.2886)


def test_auc_ties_in_a_fine_bin_count_half_and_empty_class_is_nan():
    # 0.5001 and 0.5002 share fine bin 500: the pair counts ½ whichever is the positive
    assert auc(torch.tensor([0.5001, 0.5002]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert auc(torch.tensor([0.5002, 0.5001]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert math.isnan(auc(torch.tensor([0.3, 0.7]), torch.tensor([1, 1])))


def test_calibration_metrics_use_prefix_products_over_proposed_positions():
    logits = torch.zeros(4, 2)  # σ(0) = 0.5: P_0 = 0.5, P_1 = 0.25
    acc, length = torch.tensor([0, 1, 2, 2]), torch.tensor([2, 2, 2, 1])
    m = calibration_metrics(logits, acc, length)
    pos0, pos1 = m["positions"]
    # position 0: labels acc > 0 = [0, 1, 1, 1] -> ECE |0.5 - 0.75|, Brier (0.25 + 3·0.25) / 4
    assert (pos0["count"], pos0["ece"], pos0["brier"]) == (4, pytest.approx(0.25), pytest.approx(0.25))
    # position 1: only rounds with len > 1; labels acc > 1 = [0, 0, 1] -> ECE |0.25 - 1/3|
    assert pos1["count"] == 3 and pos1["ece"] == pytest.approx(1 / 12)
    assert pos1["brier"] == pytest.approx((2 * 0.0625 + 0.5625) / 3)
    assert pos0["auc"] == pytest.approx(0.5)  # one prediction value: every pair is a tie
    assert m["ece_mean"] == pytest.approx((0.25 * 4 + 3 / 12) / 7)
    assert m["pred_mean"] == pytest.approx((0.5 * 4 + 0.25 * 3) / 7)


def test_summarize_collects_everything():
    s = summarize(ACC, LEN, EOS, confidence_logits=torch.zeros(4, 3))
    assert s["rounds"] == 4 and s["accept_len"] == pytest.approx(2.25)
    assert s["mean_proposal_len"] == pytest.approx(11 / 4)
    assert len(s["calibration"]["positions"]) == 3


def overconfident_rounds(n: int, gamma: int, seed: int = 0):
    """Head reports σ(s) but drafts are really accepted with probability σ(s/2)."""
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 + 1.5 * torch.randn(n, gamma, generator=g, dtype=torch.float64)
    passed = torch.rand(n, gamma, generator=g, dtype=torch.float64) < torch.sigmoid(logits / 2)
    accepted = passed.long().cumprod(dim=1).sum(dim=1)
    return logits, accepted, torch.full((n,), gamma)


def test_sts_recovers_the_true_temperature_and_lowers_ece():
    logits, accepted, length = overconfident_rounds(20000, 4)
    temps = fit_sts(logits, accepted, length)
    assert temps.tolist() == pytest.approx([2.0] * 4, abs=0.3)
    before = calibration_metrics(logits, accepted, length)
    held_out = overconfident_rounds(20000, 4, seed=1)
    after = calibration_metrics(*held_out, temperatures=temps)
    assert before["ece_mean"] > 0.08
    assert after["ece_mean"] < before["ece_mean"] / 4
    # order-preserving: AUC of the first position is unchanged up to the 1000-bin histogram's resolution
    assert calibration_metrics(*held_out)["positions"][0]["auc"] == pytest.approx(after["positions"][0]["auc"],
                                                                                   abs=1e-3)


def test_sts_skips_positions_no_round_reached():
    logits, accepted, _ = overconfident_rounds(2000, 3)
    temps = fit_sts(logits, accepted.clamp(max=1), torch.full((2000,), 1))
    assert temps[1:].tolist() == [1.0, 1.0] and temps[0] != 1.0


def test_apply_sts_divides_each_position_by_its_temperature():
    s = torch.tensor([[2.0, -1.0]])
    assert torch.allclose(apply_sts(s, torch.tensor([2.0, 0.5, 9.0])), torch.sigmoid(torch.tensor([[1.0, -2.0]])))


def test_calibration_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "calib.json"
    save_calibration(Calibration([2.0, 1.5], ece_before=[0.1, 0.2], ece_after=[0.01, 0.02],
                                 metadata={"drafter": "x", "temperature": 1.0}), path)
    loaded = load_calibration(path)
    assert loaded.temperatures == [2.0, 1.5] and loaded.ece_after == [0.01, 0.02]
    assert loaded.metadata["drafter"] == "x" and "date" in loaded.metadata and "method" in loaded.metadata
    with pytest.raises(DSparkError, match=r"missing\.json does not exist.*dspark-trt calibrate"):
        load_calibration(tmp_path / "missing.json")
    for bad in ("[1", json.dumps({"temps": [1]}), json.dumps({"temperatures": [1.0, -2.0]})):
        path.write_text(bad)
        with pytest.raises(DSparkError, match=r"calib\.json is malformed.*dspark-trt calibrate"):
            load_calibration(path)
