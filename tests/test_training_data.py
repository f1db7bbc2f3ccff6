"""Training data: regenerated responses are the target's own (greedy = its argmax chain), resumable by
prompt hash, the loss mask covers exactly the response, target features equal a plain per-sequence
target forward, anchors and block targets follow spec 6.2/6.3."""
import json
import lzma
import subprocess
import sys

import pytest
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.runtimes.kv_cache import KVCache
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.training.blocks import build_blocks, sample_anchors
from dspark_trt.training.code_prompts import other_language_prompts, stdlib_prompts
from dspark_trt.training.data import (FeatureExtractor, Prompt, Sample, finished_keys, load_samples, make_sample,
                                      read_training_prompts, regenerate_responses, split_held_out)
from dspark_trt.training.draft_vocab import count_response_tokens
from dspark_trt.training.losses import position_weights

from conftest import smollm2_loaded_once, tiny_target


class CharTokenizer:
    """Chat template [BOS, chars..., SEP] over a tiny vocabulary (enough for chat_prompt_ids)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        text = messages[0]["content"]
        return [0] + [2 + ord(c) % (self.vocab_size - 2) for c in text] + [1]


def _greedy(target, ids, n, stop_ids=()):
    """Argmax continuation by full re-forwards with a fresh cache (independent of the engine)."""
    ids, out = list(ids), []
    for _ in range(n):
        cache = KVCache(target.config, num_slots=1, max_seq_len=128)
        with torch.no_grad():
            logits = target(torch.tensor(ids), torch.arange(len(ids)), torch.tensor([0]), torch.tensor([len(ids)]),
                            cache).logits
        token = int(logits[0].argmax())
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


PROMPTS = [Prompt("abc", "math"), Prompt("hello world", "chat"), Prompt("x", "code"), Prompt("qrstu", "code"),
           Prompt("zz top", "chat")]


def _regen(target, tok, prompts, out, batch_size=8, **kw):
    """regenerate_responses on the torch runtime with batch_size slots; the number of responses added."""
    runtime = TorchRuntime(target, None, num_slots=batch_size, max_seq_len=64)
    return regenerate_responses(runtime, tok, prompts, out, **kw)["added"]


def test_greedy_regeneration_is_the_targets_argmax_and_resumes(tmp_path):
    target = tiny_target(vocab_size=16, seed=3, scale=3.0)
    target.config.eos_token_ids = [5]
    tok = CharTokenizer(16)
    out = tmp_path / "responses.jsonl"
    assert _regen(target, tok, PROMPTS[:3], out, max_new_tokens=12, batch_size=2, progress=False) == 3
    out.write_text(out.read_text() + '{"key": "torn')  # a crash mid-write leaves a torn last line
    assert _regen(target, tok, PROMPTS, out, max_new_tokens=12, batch_size=2, progress=False) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert sorted(r["key"] for r in rows) == sorted(p.key for p in PROMPTS)
    assert finished_keys(out) == {p.key for p in PROMPTS}
    by_key = {r["key"]: r for r in rows}
    for prompt in PROMPTS:
        row = by_key[prompt.key]
        ids = tok.apply_chat_template([{"role": "user", "content": prompt.text}], True, True)
        assert row["prompt_ids"] == ids and row["domain"] == prompt.domain
        assert row["response_ids"] == _greedy(target, ids, 12, stop_ids=(5,))
    assert _regen(target, tok, PROMPTS, out, max_new_tokens=12, progress=False) == 0


def test_gen_data_on_the_target_itself_is_its_greedy_decoding(tmp_path, smollm2):
    """`gen-data --target` (the torch runtime, decode passes batched over the requests in one attention call per
    layer: what a GPU runs) writes each prompt's greedy response, the one the engine decodes for it alone."""
    from dspark_trt.cli import main
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.request import SamplingParams

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"turns": ["Name three colors."], "domain": "chat"}\n'
                       '{"turns": ["What is 12 + 30? Explain."], "domain": "math"}\n'
                       '{"turns": ["Write a haiku about rain."], "domain": "chat"}\n')
    out = tmp_path / "responses.jsonl"
    args = ["gen-data", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "12", "--concurrency", "3",
            "--sampled-share", "0"]
    with smollm2_loaded_once(smollm2):
        assert main([*args, "--target", "smollm2"]) == 0
    assert main([*args, "--engines", str(tmp_path), "--device", "cuda"]) == 2  # engines run on the CPU
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    model, tokenizer = smollm2
    engine = Engine(TorchRuntime(model, None, num_slots=1, max_seq_len=256))
    for row in rows:
        params = SamplingParams(max_tokens=12, stop_ids=tuple(model.config.eos_token_ids))
        alone = engine.generate([row["prompt_ids"]], params)
        assert row["response_ids"] == alone[0].output_ids and len(row["response_ids"]) >= 1


def test_sampled_regeneration_is_reproducible_per_prompt(tmp_path):
    target = tiny_target(vocab_size=16, seed=4)
    tok = CharTokenizer(16)
    kw = dict(max_new_tokens=10, temperature=0.7, top_p=0.8, progress=False)
    _regen(target, tok, PROMPTS, tmp_path / "a.jsonl", batch_size=4, **kw)
    _regen(target, tok, PROMPTS[::-1], tmp_path / "b.jsonl", batch_size=1, **kw)
    _regen(target, tok, PROMPTS, tmp_path / "greedy.jsonl", max_new_tokens=10, progress=False)

    def responses(name):
        return {r["key"]: r["response_ids"] for r in map(json.loads, (tmp_path / name).read_text().splitlines())}

    assert responses("a.jsonl") == responses("b.jsonl")  # seed from the prompt hash, not batch order
    assert responses("a.jsonl") != responses("greedy.jsonl")


def test_a_sampled_share_of_prompts_is_drawn_at_its_temperature(tmp_path):
    target = tiny_target(vocab_size=16, seed=4)
    tok = CharTokenizer(16)
    prompts = [Prompt(f"p{i}", "chat") for i in range(40)]
    _regen(target, tok, prompts, tmp_path / "mixed.jsonl", max_new_tokens=6, sampled_share=0.5,
           sampled_temperature=0.7, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    sampled = {r["key"] for r in rows if r["temperature"] == pytest.approx(0.7)}
    assert 10 <= len(sampled) <= 30 and all(r["temperature"] in (0.0, pytest.approx(0.7)) for r in rows)
    again = tmp_path / "again.jsonl"  # which prompts are sampled depends on the prompt alone
    _regen(target, tok, prompts[::-1], again, batch_size=3, max_new_tokens=6, sampled_share=0.5,
           sampled_temperature=0.7, progress=False)
    assert {r["key"] for r in map(json.loads, again.read_text().splitlines()) if r["temperature"] > 0} == sampled


def test_read_training_prompts_dedupes_and_names_bad_lines(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"turns": ["a"], "domain": "math"}\n{"turns": ["b"]}\n{"turns": ["a"], "domain": "math"}\n')
    prompts = read_training_prompts([good])
    assert [(p.text, p.domain) for p in prompts] == [("a", "math"), ("b", "chat")]
    assert len(read_training_prompts([good], limit_per_file=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["a"]}\n{"text": "b"}\n')
    with pytest.raises(DSparkError, match="bad.jsonl:2"):
        read_training_prompts([bad])
    with pytest.raises(DSparkError, match="not found"):
        read_training_prompts([tmp_path / "missing.jsonl"])


def test_loss_mask_covers_the_response_and_short_samples_are_dropped(tmp_path):
    sample = make_sample([7, 8, 9], [1, 2, 3, 4], max_length=6)
    assert sample.input_ids.tolist() == [7, 8, 9, 1, 2, 3]
    assert sample.loss_mask.tolist() == [False, False, False, True, True, True]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps({"prompt_ids": [1, 2], "response_ids": list(range(n))}) for n in (3, 20)))
    samples = load_samples(path, max_length=64, min_loss_tokens=14)
    assert [len(s) for s in samples] == [22]
    packed = tmp_path / "r.jsonl.xz"  # a finished set as committed: read as it is
    packed.write_bytes(lzma.compress(path.read_bytes()))
    assert [s.input_ids.tolist() for s in load_samples(packed, 64, 14)] == [s.input_ids.tolist() for s in samples]
    assert count_response_tokens(packed) == count_response_tokens(path)


def test_bf16_features_are_computed_in_bfloat16_and_stay_close():
    target = tiny_target(vocab_size=16, seed=5, num_layers=3)
    batch = [Sample(torch.tensor([1, 4, 2, 9, 3, 7]), torch.ones(6, dtype=torch.bool))]
    exact = FeatureExtractor(target, [0, 1], max_batch=1, max_length=32)(batch)
    fast = FeatureExtractor(target, [0, 1], max_batch=1, max_length=32, precision="bf16")(batch)
    for name in ("taps", "last_hidden", "target_lse"):
        a, b = getattr(exact, name), getattr(fast, name)
        assert b.dtype == torch.float32 and not torch.equal(a, b), name  # really computed in bfloat16
        assert torch.allclose(a, b, rtol=0.05, atol=0.05), name


def test_features_equal_a_plain_target_forward():
    target = tiny_target(vocab_size=16, seed=5, num_layers=3)
    seqs = [torch.tensor([1, 4, 2, 9, 3]), torch.tensor([5, 6, 7])]
    extractor = FeatureExtractor(target, [0, 1], max_batch=2, max_length=32)
    feats = extractor([Sample(s, torch.ones_like(s, dtype=torch.bool)) for s in seqs])
    assert feats.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and feats.seq.tolist() == [0] * 5 + [1] * 3
    row = 0
    for seq in seqs:
        cache = KVCache(target.config, num_slots=1, max_seq_len=32)
        with torch.no_grad():
            out = target(seq, torch.arange(len(seq)), torch.tensor([0]), torch.tensor([len(seq)]), cache,
                         tap_layers=[0, 1], logits_rows="all")
        n = len(seq)
        torch.testing.assert_close(feats.taps[row: row + n], out.taps)
        with torch.no_grad():  # the teacher's logits: frozen lm_head of the final-normed last state
            torch.testing.assert_close(target.lm_head(feats.last_hidden[row: row + n]), out.logits)
        row += n
    with pytest.raises(DSparkError, match="last layer"):
        FeatureExtractor(target, [0, 2], max_batch=1, max_length=8)


def test_anchors_are_distinct_supervised_and_sorted():
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    allowed = {2, 3, 6, 7, 8}
    assert sample_anchors(mask, 100, torch.Generator().manual_seed(0)).tolist() == sorted(allowed)
    seen = set()
    for seed in range(20):
        a = sample_anchors(mask, 3, torch.Generator().manual_seed(seed)).tolist()
        assert len(a) == 3 and a == sorted(set(a)) and set(a) <= allowed
        seen |= set(a)
    assert seen == allowed  # uniform choice reaches every candidate


def test_block_targets_follow_teacher_forcing_and_the_supervision_mask():
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    sample = Sample(ids, torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool))
    other = Sample(torch.tensor([20, 21, 22, 23]), torch.tensor([0, 1, 1, 0], dtype=torch.bool))
    w = position_weights(3)
    blocks = build_blocks([sample, other], [torch.tensor([2, 4]), torch.tensor([1])], 3, w)
    assert blocks.anchor_ids.tolist() == [12, 14, 21] and blocks.anchor_seq.tolist() == [0, 0, 1]
    assert blocks.labels.tolist() == [[13, 14, 15], [15, 0, 0], [22, 23, 0]]
    assert blocks.prev_tokens.tolist() == [[12, 13, 14], [14, 15, 0], [21, 22, 23]]
    expected = torch.tensor([[w[0], w[1], w[2]], [w[0], 0, 0], [w[0], 0, 0]])  # 23 is outside the loss mask
    torch.testing.assert_close(blocks.weights, expected)
    # slot k's teacher state is at position p+k (packed rows: the second sequence starts at row 6)
    assert blocks.target_rows[0].tolist() == [2, 3, 4] and blocks.target_rows[2].tolist() == [7, 8, 9]


def test_code_prompts_from_the_standard_library_and_other_languages():
    prompts = stdlib_prompts(("bisect", "textwrap"))
    texts = [p.text for p in prompts]
    assert all(p.domain == "code" for p in prompts)
    assert any("`dedent(text)`" in t and t.startswith("Write a Python function") for t in texts)
    assert any(t.startswith("Explain what the Python standard library function `textwrap.dedent(text)`") for t in texts)
    assert stdlib_prompts(("bisect", "textwrap")) == prompts


def test_code_prompts_are_the_same_in_every_process():
    """Defaults such as shutil.copytree's `copy_function=copy2` must not print a memory address,
    or every training run would see new prompts (and regenerate their responses)."""
    code = "from dspark_trt.training.code_prompts import stdlib_prompts as s; print([p.text for p in s(('shutil',))])"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert "copy_function=copy2" in runs[0] and "0x" not in runs[0]
    translated = other_language_prompts([Prompt("Write f.", "code")] * 6)
    assert [t.text.rsplit(" ", 4)[-4] for t in translated][:2] == ["C++", "Java"]
    assert translated[5].text.endswith("in C++ instead of Python.")


def test_prompts_with_unicode_line_separators_inside_strings_are_one_line(tmp_path):
    """JSON Lines are split at newlines only: a raw U+2028 inside a prompt (GSM8K has some) is text."""
    from dspark_trt.engine.prompts import read_prompts_file

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"turns": ["a\u2028b"], "domain": "math"}, ensure_ascii=False) + "\n"
                    + json.dumps({"turns": ["c"]}) + "\n", encoding="utf-8")
    assert [p.text for p in read_training_prompts([path])] == ["a\u2028b", "c"]
    assert read_prompts_file(path) == ["a\u2028b", "c"]


def test_split_held_out_keeps_every_100th_sample_at_most_64_out_of_training():
    samples = list(range(7000))
    held_out, training = split_held_out(samples)
    assert held_out == list(range(0, 6400, 100))  # capped at 64: 6400 and later strides train
    assert 6400 in training and 100 not in training and 101 in training
    assert sorted(held_out + training) == samples
