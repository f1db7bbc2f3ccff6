"""`dspark-trt train-draft` end to end on a tiny target: the loss goes down, the checkpoint loads and
drafts better than the untrained drafter, an interrupted run resumes to the same weights, bad
options are named."""
import json
import random

import pytest
import torch

import dspark_trt.commands.train_draft as train_draft
from dspark_trt.cli import main
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.request import SamplingParams
from dspark_trt.models.drafter_checkpoint import load_drafter, random_drafter
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.scheduler import make_scheduler
from dspark_trt.training.trainer import TrainConfig, Trainer, lr_factor

from conftest import tiny_target
from test_training_data import CharTokenizer

VOCAB = 16


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    target = tiny_target(vocab_size=VOCAB, seed=11, num_layers=3, scale=3.0)
    target.config.eos_token_ids = []
    monkeypatch.setattr(train_draft, "load_target", lambda name: (target, CharTokenizer(VOCAB)))
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": ["".join(rng.choice("abcdefghij") for _ in range(6))],
                                           "domain": "chat"}) + "\n" for _ in range(12)))
    return target, prompts


def _args(prompts, out, steps=40, *extra):
    return ["train-draft", "--target", "tiny", "--prompts", str(prompts), "--out", str(out), "--steps", str(steps),
            "--block-size", "4", "--draft-layers", "1", "--markov-rank", "8", "--taps", "0", "1",
            "--batch-size", "2", "--num-anchors", "16", "--max-new-tokens", "24", "--min-loss-tokens", "4",
            "--lr", "1e-2", "--checkpoint-every", "5", "--max-length", "64", "--gen-batch", "4", "--mask-token-id", "15",
            *extra]


def _mean_accepted(target, drafter):
    engine = Engine(TorchRuntime(target, drafter, num_slots=4, max_seq_len=64), make_scheduler("fixed", 4))
    prompts = [[0] + [2 + (7 * i + 3 * j) % 14 for j in range(5)] + [1] for i in range(4)]  # unseen prompts
    requests = engine.generate(prompts, SamplingParams(max_tokens=24))
    lengths = [n for r in requests for n in r.stats.accepted_lengths]
    return sum(lengths) / len(lengths)


def test_training_lowers_the_loss_and_the_checkpoint_drafts(tiny, tmp_path, capsys):
    target, prompts = tiny
    out = tmp_path / "run"
    assert main(_args(prompts, out)) == 0
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    drafter = load_drafter(out)
    assert drafter.config.block_size == 4 and drafter.config.markov_rank == 8
    assert drafter.config.target_layer_ids == [0, 1]
    untrained = random_drafter(drafter.config, seed=42, target=target)
    trained_tau, untrained_tau = _mean_accepted(target, drafter), _mean_accepted(target, untrained)
    assert trained_tau > untrained_tau + 0.5, (trained_tau, untrained_tau)
    assert "drafter in" in capsys.readouterr().out


def test_an_interrupted_run_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    target, prompts = tiny
    assert main(_args(prompts, tmp_path / "straight", 12)) == 0
    save = Trainer.save

    def save_then_die(self):
        save(self)
        if self.step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", save_then_die)
    assert main(_args(prompts, tmp_path / "resumed", 12)) == 130
    responses = (tmp_path / "resumed" / "responses.jsonl").read_bytes()
    monkeypatch.setattr(Trainer, "save", save)
    assert main(_args(prompts, tmp_path / "resumed", 12)) == 0
    assert (tmp_path / "resumed" / "responses.jsonl").read_bytes() == responses  # not regenerated
    a, b = load_drafter(tmp_path / "straight"), load_drafter(tmp_path / "resumed")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
    # resuming with other settings is refused, not silently mixed
    assert main(_args(prompts, tmp_path / "resumed", 12, "--num-anchors", "8")) == 2


def test_a_finished_run_trains_on_when_its_steps_are_raised(tiny, tmp_path):
    _, prompts = tiny
    out = tmp_path / "run"
    assert main(_args(prompts, out, 6)) == 0
    assert main(_args(prompts, out, 10)) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))  # steps 7-10 appended, 1-6 not retaken
    # from step 7 on, the rate is the 10-step run's cosine, not the 6-step one's (which had ended near 0)
    for r in records[6:]:
        assert r["lr"] == pytest.approx(1e-2 * lr_factor(r["step"] - 1, 10, TrainConfig().warmup_frac))
    assert records[6]["lr"] > 3 * records[5]["lr"]


@pytest.mark.parametrize("extra, message", [
    (["--block-size", "0"], "--block-size must be positive"),
    (["--taps", "0", "5"], "target_layer_ids"),
    (["--taps", "0", "2"], "the target's last layer"),
    (["--markov-rank", "-1"], "--markov-rank"),
])
def test_bad_options_are_named(tiny, tmp_path, capsys, extra, message):
    _, prompts = tiny
    assert main(_args(prompts, tmp_path / "bad", 2, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "responses.jsonl").exists()  # refused before the long regeneration


def test_dflash_recipe_trains_the_ablation_without_markov_and_confidence(tiny, tmp_path):
    _, prompts = tiny
    assert main(_args(prompts, tmp_path / "dflash", 3, "--recipe", "dflash")) == 0
    drafter = load_drafter(tmp_path / "dflash")
    assert drafter.config.markov_rank == 0 and drafter.markov_head is None
    assert not drafter.config.enable_confidence_head and drafter.confidence_head is None
    for line in (tmp_path / "dflash" / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert "conf" not in record and record["loss"] == pytest.approx(record["ce"], rel=1e-6)


def test_responses_option_trains_on_an_earlier_runs_data_without_regenerating(tiny, tmp_path):
    _, prompts = tiny
    assert main(_args(prompts, tmp_path / "first", 3, "--recipe", "dflash")) == 0
    args = _args(prompts, tmp_path / "again", 3, "--recipe", "dflash")
    args[args.index("--prompts"): args.index("--prompts") + 2] = ["--responses", str(tmp_path / "first" / "responses.jsonl")]
    assert main(args + ["--feature-cache", str(tmp_path / "first" / "feature_cache")]) == 0
    assert not (tmp_path / "again" / "responses.jsonl").exists()
    first, again = ((tmp_path / run / "train_log.jsonl").read_text().splitlines() for run in ("first", "again"))
    assert len(again) == 3
    for a, b in zip(first, again):  # same data, seed and anchors; features from the float16 cache
        assert json.loads(b)["loss"] == pytest.approx(json.loads(a)["loss"], rel=1e-2)


def test_a_reduced_draft_vocabulary_is_the_most_frequent_response_tokens_and_trains(tiny, tmp_path):
    from collections import Counter

    target, prompts = tiny
    out = tmp_path / "run"
    assert main(_args(prompts, out, 40, "--draft-vocab", "6")) == 0
    drafter = load_drafter(out)
    assert drafter.config.draft_vocab_size == 6 and drafter.lm_head.weight.shape[0] == 6
    counts = Counter(t for line in (out / "responses.jsonl").read_text().splitlines()
                     for t in json.loads(line)["response_ids"])
    top = {t for t, _ in counts.most_common(6)}
    assert min(counts[t] for t in drafter.draft_ids.tolist()) >= min(counts[t] for t in top)
    record = json.loads((out / "draft_vocab.json").read_text())
    assert record["draft_vocab_size"] == 6 and 0 < record["coverage_held_out"]["6"] <= 1
    untrained = random_drafter(drafter.config, seed=42, target=target, draft_ids=drafter.draft_ids)
    assert _mean_accepted(target, drafter) > _mean_accepted(target, untrained) + 0.3
    params = SamplingParams(max_tokens=24)
    prompts_ids = [[0, 3, 5, 7, 1], [0, 9, 2, 1]]
    ar = [r.output_ids for r in Engine(TorchRuntime(target, num_slots=2, max_seq_len=64)).generate(prompts_ids, params)]
    spec = Engine(TorchRuntime(target, drafter, num_slots=2, max_seq_len=64), make_scheduler("fixed", 4))
    assert [r.output_ids for r in spec.generate(prompts_ids, params)] == ar
