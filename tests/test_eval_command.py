"""`dspark-trt eval`: aggregation on hand-built rounds, and the command on SmolLM2 with a random drafter."""
import hashlib
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import smollm2_loaded_once, tiny_drafter, tiny_target
from dspark_trt.cli import main
from dspark_trt.engine.request import RequestStats
from dspark_trt.spec.eval_stats import Rounds, eval_stats, json_safe, rounds_from_requests

GAMMA = 3
# four rounds, γ = 3: the last proposed 2 drafts and accepted both, the second being EOS
ACC = torch.tensor([3, 1, 0, 2])
LEN = torch.tensor([3, 3, 3, 2])
EOS = torch.tensor([False, False, False, True])


def _rounds(logit: float) -> Rounds:
    return Rounds(ACC, LEN, EOS, torch.full((4, GAMMA), logit, dtype=torch.float64))


def test_eval_stats_hand_computed():
    s = eval_stats(_rounds(0.0), GAMMA)
    assert s["rounds"] == 4
    assert s["tau"] == pytest.approx(9 / 4)  # τ = 4 + 2 + 1 + 2 (EOS round: no bonus)
    assert s["acceptance_rate"] == pytest.approx(9 / 15)  # Σ τ / (Σ proposal_len + rounds)
    assert s["accepted_histogram"] == [1, 1, 1, 1]
    # k=0: all 4 reached, 3 accepted; k=1: rounds 0,1,3 reached, 0,3 accepted; k=2: only round 0 proposed it
    assert s["position_reached"] == [4, 3, 1] and s["position_accepted"] == [3, 2, 1]
    assert s["conditional_acceptance"] == pytest.approx([3 / 4, 2 / 3, 1.0])
    assert s["prefix_survival"] == pytest.approx([3 / 4, 2 / 4, 1 / 3])
    before = s["calibration"]["before"]
    assert s["calibration"]["after"] is None
    # σ(0) = 1/2, so P_k = 2^-(k+1); labels: k=0 [1,1,0,1], k=1 [1,0,0,1], k=2 (rounds 0-2) [1,0,0]
    assert [p["count"] for p in before["positions"]] == [4, 4, 3]
    assert [p["ece"] for p in before["positions"]] == pytest.approx([0.25, 0.25, 1 / 3 - 1 / 8])
    assert before["positions"][0]["brier"] == pytest.approx(0.25)
    bins = {i: b for i, b in enumerate(before["reliability"]) if b["count"]}
    assert sorted(bins) == [2, 5, 10]  # 0.125, 0.25, 0.5 with 20 bins
    assert (bins[10]["count"], bins[10]["observed"], bins[10]["pred_mean"]) == (4, 0.75, 0.5)
    assert (bins[5]["count"], bins[5]["observed"]) == (4, 0.5)
    assert (bins[2]["count"], bins[2]["observed"]) == (3, pytest.approx(1 / 3))


def test_eval_stats_after_sts_divides_logits_by_the_temperatures():
    # s = 2 ln 3: raw σ = 0.9; with T = 2, σ(ln 3) = 0.75 (temperatures may be longer than γ)
    s = eval_stats(_rounds(2 * math.log(3)), GAMMA, torch.tensor([2.0, 2.0, 2.0, 5.0]))
    before, after = s["calibration"]["before"], s["calibration"]["after"]
    assert before["positions"][0]["ece"] == pytest.approx(0.15)
    assert [p["ece"] for p in after["positions"]] == pytest.approx([0.0, 0.75**2 - 0.5, 0.75**3 - 1 / 3])
    assert [p["auc"] for p in after["positions"]] == [p["auc"] for p in before["positions"]]


def test_rounds_from_requests_ends_a_round_at_an_accepted_stop_token():
    stats = RequestStats(round_verified=[7, 7, 3], round_accepted=[2, 5, 1], accepted_lengths=[3, 2, 2],
                         round_confidence_logits=[[0.0] * 7, [1.0] * 7, [2.0] * 7])
    r = rounds_from_requests([SimpleNamespace(stats=stats)], 7)
    # round 2 committed 2 tokens although 5 drafts passed: draft 1 was a stop id (no bonus)
    assert r.accepted.tolist() == [2, 2, 1] and r.proposal_len.tolist() == [7, 2, 3]
    assert r.eos_terminated.tolist() == [False, True, False]
    assert r.confidence_logits.shape == (3, 7) and r.confidence_logits[2, 0] == 2.0
    assert eval_stats(r, 7)["tau"] == pytest.approx((3 + 2 + 2) / 3)
    no_head = rounds_from_requests([SimpleNamespace(stats=RequestStats(round_verified=[7], round_accepted=[0],
                                                                       accepted_lengths=[1]))], 7)
    assert no_head.confidence_logits is None and eval_stats(no_head, 7)["calibration"] is None


def test_json_safe_turns_nan_into_null():
    assert json.dumps(json_safe({"a": [math.nan, 1.0], "b": (math.inf,)})) == '{"a": [null, 1.0], "b": [null]}'


def _eval(argv: list[str]) -> int:
    """Run the CLI in-process as `dspark-trt eval ...` (sys.argv is what the results record as the command)."""
    saved = sys.argv
    sys.argv = ["dspark-trt", "eval", *argv]
    try:
        return main(["eval", *argv])
    finally:
        sys.argv = saved


def test_bad_dataset_paths_and_empty_datasets_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert _eval(["--draft", str(tmp_path), "--datasets", str(missing)]) == 2
    assert f"dataset file not found: {missing}" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _eval(["--draft", str(tmp_path), "--datasets", str(empty)]) == 2
    assert "has no prompts" in capsys.readouterr().err
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"turns": ["hi"]}\n')
    assert _eval(["--draft", str(tmp_path / "no-drafter"), "--datasets", str(ok)]) == 2
    assert "drafter directory not found" in capsys.readouterr().err


PROMPTS = ["What is 7 times 8?", "Name three colours."]
MAX_NEW = 10
BLOCK = 4
TEMPS = [2.0] * BLOCK


# End to end on the real target (the session's, handed to the command) and a random drafter: about half a
# minute on 2 idle cores, hence `slow`.
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, smollm2):
    """A random SmolLM2 drafter with a calibration next to it, evaluated by the CLI on a 2-prompt dataset."""
    from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter, save_drafter
    from dspark_trt.spec.calibration import Calibration, save_calibration

    root = tmp_path_factory.mktemp("eval")
    target, _ = smollm2
    drafter = random_drafter(drafter_config_for_target(target.config, block_size=BLOCK), seed=0, target=target)
    save_drafter(drafter, root / "draft", dtype=torch.bfloat16)
    save_calibration(Calibration(TEMPS), root / "draft" / "calibration.json")
    dataset = root / "tiny.jsonl"
    dataset.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in PROMPTS))
    argv = ["--draft", str(root / "draft"), "--datasets", str(dataset), "--max-new-tokens", str(MAX_NEW),
            "--plot", str(root / "plots"), "--out", str(root / "out.json")]
    with smollm2_loaded_once(smollm2):
        assert _eval(argv) == 0
    return root, json.loads((root / "out.json").read_text())


@pytest.fixture(scope="module")
def own_run(evaluated, smollm2):
    """The same prompts through an engine built here, for numbers derived independently of eval."""
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.prompts import chat_prompt_ids
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.models.drafter_checkpoint import load_drafter
    from dspark_trt.runtimes.torch_runtime import TorchRuntime
    from dspark_trt.spec.scheduler import make_scheduler

    root, _ = evaluated
    target, tokenizer = smollm2
    runtime = TorchRuntime(target, load_drafter(root / "draft"), num_slots=8)
    engine = Engine(runtime, make_scheduler("fixed", block_size=BLOCK, has_confidence=True), record_rounds=True)
    params = SamplingParams(max_tokens=MAX_NEW, stop_ids=tuple(runtime.eos_token_ids))
    requests = engine.generate([chat_prompt_ids(tokenizer, p) for p in PROMPTS], params)
    assert not any(r.error for r in requests)
    return requests


@pytest.mark.slow
def test_tau_and_counts_match_an_independent_engine_run(evaluated, own_run):
    _, report = evaluated
    ds = report["datasets"]["tiny"]
    committed = sum(len(r.output_ids) - 1 for r in own_run)  # the first token comes from prefill, not a round
    rounds = sum(len(r.stats.round_verified) for r in own_run)
    assert ds["rounds"] == rounds and ds["prompts"] == 2
    assert ds["generated_tokens"] == sum(len(r.output_ids) for r in own_run)
    assert ds["tau"] == pytest.approx(committed / rounds)
    verified = sum(sum(r.stats.round_verified) for r in own_run)
    assert ds["acceptance_rate"] == pytest.approx(committed / (verified + rounds))
    assert report["all"]["tokens_per_second"] == pytest.approx(ds["generated_tokens"] / report["all"]["seconds"])
    for key in ("generated_tokens", "rounds", "tau", "acceptance_rate", "accepted_histogram", "conditional_acceptance"):
        assert report["all"][key] == ds[key], key  # one dataset: the aggregate is the same


@pytest.mark.slow
def test_conditional_acceptance_is_consistent_with_the_histogram(evaluated):
    ds = evaluated[1]["datasets"]["tiny"]
    hist, reached, passed = ds["accepted_histogram"], ds["position_reached"], ds["position_accepted"]
    assert sum(hist) == ds["rounds"] and len(hist) == BLOCK + 1
    for k in range(BLOCK):
        # accepting draft k means reaching and passing it: #passed_k = #(acc > k); #reached_k ≤ #(acc ≥ k)
        assert passed[k] == sum(hist[k + 1:])
        assert passed[k] <= reached[k] <= sum(hist[k:])
        expected = passed[k] / reached[k] if reached[k] else None
        assert ds["conditional_acceptance"][k] == (pytest.approx(expected) if expected is not None else None)
    assert reached[0] > 0


@pytest.mark.slow
def test_calibration_before_and_after_from_the_recorded_confidences(evaluated, own_run):
    _, report = evaluated
    assert report["calibration"]["temperatures"] == TEMPS  # picked up next to the drafter by default
    cal = report["datasets"]["tiny"]["calibration"]
    logits = torch.tensor([c for r in own_run for c in r.stats.round_confidence_logits], dtype=torch.float64)
    proposed = torch.tensor([v for r in own_run for v in r.stats.round_verified])
    first = logits[proposed > 0, 0]
    before, after = cal["before"]["positions"][0], cal["after"]["positions"][0]
    assert before["count"] == after["count"] == int((proposed > 0).sum())
    assert before["pred_mean"] == pytest.approx(float(torch.sigmoid(first).mean()), rel=1e-4)
    assert after["pred_mean"] == pytest.approx(float(torch.sigmoid(first / 2).mean()), rel=1e-4)
    assert [p["count"] for p in cal["before"]["positions"]] == [int((proposed > k).sum()) for k in range(BLOCK)]
    assert sum(b["count"] for b in cal["before"]["reliability"]) == int(proposed.sum())


@pytest.mark.slow
def test_results_record_command_revision_hashes_and_identity(evaluated):
    root, report = evaluated
    dataset = root / "tiny.jsonl"
    assert report["datasets"]["tiny"]["sha256"] == hashlib.sha256(dataset.read_bytes()).hexdigest()
    assert report["command"].startswith("dspark-trt eval --draft ") and str(dataset) in report["command"]
    rev = report["git_revision"]
    assert rev == "unknown" or len(rev.removesuffix("-dirty")) == 40
    assert report["draft"]["config_sha256"] == hashlib.sha256((root / "draft" / "config.json").read_bytes()).hexdigest()
    assert report["draft"]["block_size"] == BLOCK and report["target"]["name"] == "smollm2"
    assert report["options"]["max_new_tokens"] == MAX_NEW and report["machine"]["cpu_count"] >= 1


@pytest.mark.slow
def test_plots_are_png_files(evaluated):
    import matplotlib.pyplot as plt

    root, _ = evaluated
    for name in ("acceptance_tiny", "reliability_tiny", "acceptance_all", "reliability_all"):
        path = root / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        height, width, _ = plt.imread(path).shape
        assert height > 100 and width > 100


def test_a_drafter_for_another_target_is_refused(tmp_path, capsys):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dspark_trt.models.drafter_checkpoint import save_drafter
    from dspark_trt.models.sources import load_tokenizer, resolve_model

    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(tmp_path)
    load_tokenizer(resolve_model("smollm2")).save_pretrained(tmp_path)
    save_drafter(tiny_drafter(tiny_target(), block_size=3), tmp_path / "draft")  # hidden 16, vocab 8
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"turns": ["hi"]}\n')
    assert _eval(["--target", str(tmp_path), "--draft", str(tmp_path / "draft"), "--datasets", str(dataset),
                  "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "drafter does not match the target: hidden_size 16 != target 32; vocab_size 8 != target 64" in err
