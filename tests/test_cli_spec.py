"""The speculative CLI end to end on a tiny model pair: generate with each schedule, profile, calibrate."""
import contextlib
import io
import json

import pytest
import torch

from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter, save_drafter
from dspark_trt.models.weights import load_target

WORDS = [f"w{i}" for i in range(12)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Qwen3 target directory (with a word-level tokenizer and chat template) and a drafter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=1)
    hf = Qwen3ForCausalLM(config)
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(root / "target")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1")
    fast.chat_template = "{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}w4"
    fast.save_pretrained(root / "target")
    target, _ = load_target(str(root / "target"))
    cfg = drafter_config_for_target(target.config, block_size=4, num_draft_layers=1, target_layer_ids=[0, 1],
                                    markov_rank=4, mask_token_id=11)
    drafter = random_drafter(cfg, seed=3, target=target)
    save_drafter(drafter, root / "draft")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [" ".join(WORDS[5 + i % 6] for i in range(n))]}) + "\n"
                               for n in range(3, 11)))
    return root


def _cli(*args) -> str:
    """The CLI run in this process (a subprocess a call spent seconds importing); returns its stdout."""
    from dspark_trt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def _generate(pair, *extra):
    out = _cli("generate", "--target", str(pair / "target"), "--prompts-file", str(pair / "prompts.jsonl"),
               "--max-tokens", "12", "--json", *extra)
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow
def test_every_schedule_gives_the_autoregressive_greedy_output(pair):
    ar = _generate(pair, "--no-spec")
    cost = pair / "cost.json"
    _cli("profile", "--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out", str(cost),
         "--batch-sizes", "1,2,4,8", "--repeats", "2", "--context-len", "16")
    table = json.loads(cost.read_text())
    assert table["batch_sizes"] == [1, 2, 4, 8] and len(table["draft_seconds"]) > 0
    # a row per request count of the diagonal, each from R tokens up to R·(block + 1), capped at 8
    rows = {row["requests"]: row["batch_sizes"] for row in table["by_requests"]}
    assert rows == {1: [1, 2, 3, 4, 5], 2: [2, 4, 6, 8], 4: [4, 8], 8: [8]}
    assert table["metadata"]["runtime"] == "torch"
    calib = pair / "calib.json"
    report = json.loads(_cli("calibrate", "--target", str(pair / "target"), "--draft", str(pair / "draft"),
                             "--prompts", str(pair / "prompts.jsonl"), "--out", str(calib), "--json"))
    assert report["rounds"] > 0 and len(report["temperatures"]) == 4
    assert json.loads(calib.read_text())["temperatures"] == report["temperatures"]
    for extra in (["--schedule", "fixed"], ["--schedule", "fixed", "--gamma", "2"],
                  ["--schedule", "threshold", "--threshold", "0.3"],
                  ["--schedule", "dspark", "--cost-table", str(cost), "--calibration", str(calib)],
                  ["--schedule", "async", "--cost-table", str(cost), "--concurrency", "4"]):
        spec = _generate(pair, "--draft", str(pair / "draft"), *extra)
        assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in ar], extra
        assert all(len(r["accepted_lengths"]) >= 1 for r in spec)


def test_generate_defaults_to_dspark_with_a_table_profiled_once_on_this_machine(pair, tmp_path, monkeypatch, capsys):
    """No --schedule, no --cost-table: the dspark schedule, its table profiled by the first run and read from the
    cache by the next (broken entries: test_cost_cache.py); --cost-table overrides; always the --no-spec tokens."""
    from dspark_trt.cli import main
    from dspark_trt.spec.cost_table import CostTable

    monkeypatch.setenv("DSPARK_TRT_CACHE", str(tmp_path))
    common = ["--target", str(pair / "target"), "--prompts-file", str(pair / "prompts.jsonl"), "--limit", "3",
              "--max-tokens", "12", "--json"]
    draft = ["--draft", str(pair / "draft")]

    def generate(*extra):
        assert main(["generate", *common, *extra]) == 0
        out, err = capsys.readouterr()
        return [json.loads(line)["token_ids"] for line in out.splitlines()], err

    plain, _ = generate("--no-spec")
    ids, err = generate(*draft)
    [entry] = (tmp_path / "cost-tables").glob("*.json")
    assert ids == plain and f"schedule dspark, cost table {entry} (freshly profiled)" in err
    table = CostTable.from_json(entry)
    assert table.metadata["runtime"] == "torch" and sorted(table.by_requests) == [1, 2, 4, 8]
    assert table.by_requests[8][0] == [8, 16, 32, 40]  # the reduced grid: 1, 2, 4 and block + 1 tokens a request
    stamp = entry.stat().st_mtime_ns
    ids, err = generate(*draft)
    assert ids == plain and f"cost table {entry} (cached)" in err and "profil" not in err
    assert entry.stat().st_mtime_ns == stamp
    given = tmp_path / "given.json"
    CostTable.synthetic().to_json(given)
    ids, err = generate(*draft, "--cost-table", str(given))
    assert ids == plain and "cost table" not in err and entry.stat().st_mtime_ns == stamp
    assert main(["generate", *common, *draft, "--cost-table", str(tmp_path / "missing.json")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err


def test_the_default_schedule_is_dspark_fixed_without_a_confidence_head_and_off_without_a_drafter(pair, tmp_path):
    from dspark_trt.engine.factory import default_schedule
    from dspark_trt.graphs.manifest import FORMAT

    assert default_schedule(str(pair / "draft"), None) == default_schedule("default", None) == "dspark"
    blind = tmp_path / "draft"
    blind.mkdir()
    config = json.loads((pair / "draft" / "config.json").read_text())
    (blind / "config.json").write_text(json.dumps({**config, "enable_confidence_head": False}))
    assert default_schedule(str(blind), None) == "fixed"
    assert default_schedule(None, None) == "off"
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "graphs": {}, "draft": None}))
    assert default_schedule(None, str(tmp_path)) == "off"


def test_generate_with_logit_controls_speculates_to_the_plain_tokens_and_prints_logprobs(pair, capsys):
    from dspark_trt.cli import main

    common = ["--max-tokens", "12", "--json", "--target", str(pair / "target"), "--prompts-file",
              str(pair / "prompts.jsonl"), "--limit", "3"]
    controls = ["--repetition-penalty", "1.5", "--frequency-penalty", "0.3", "--min-tokens", "6", "--bad-word", "w7",
                "--logprobs", *common]
    records = {}
    for mode in (["--no-spec"], ["--draft", str(pair / "draft"), "--schedule", "fixed"]):  # fixed: every step drafts
        assert main(["generate", *mode, *controls]) == 0
        records[mode[0]] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    plain, spec = records["--no-spec"], records["--draft"]
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain]
    for r, p in zip(spec, plain):
        assert len(r["logprobs"]) == r["num_tokens"] >= 6 and 7 not in r["token_ids"]
        assert r["logprobs"] == pytest.approx(p["logprobs"], abs=1e-4) and all(lp <= 0 for lp in r["logprobs"])
    assert main(["generate", "--no-spec", "--bad-word", " ", *common]) == 2
    assert "--bad-word holds ' '" in capsys.readouterr().err
