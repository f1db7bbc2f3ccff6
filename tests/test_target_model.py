"""Our target decoder against transformers: prefill, incremental steps, ragged batches, rollback, taps."""
import json

import pytest
import torch

from dspark_trt.errors import DSparkError, ModelNotFoundError, UnsupportedModelError
from dspark_trt.models.weights import load_target
from dspark_trt.runtimes.kv_cache import KVCache

TOL = 1e-4


def _feed(model, cache, slot, ids, taps=(), rows="all"):
    start = int(cache.lengths[slot])
    ids = torch.as_tensor(ids)
    return model(ids, torch.arange(start, start + len(ids)), torch.tensor([slot]), torch.tensor([len(ids)]),
                 cache, tap_layers=taps, logits_rows=rows)


def _check_prefill_and_steps(model, hf, ids, steps=4):
    """Prefill then `steps` single-token steps: logits equal transformers' full recompute each time."""
    cache = KVCache(model.config, num_slots=2, max_seq_len=128)
    slot = cache.allocate()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        out = _feed(model, cache, slot, ids)
        assert (out.logits - ref).abs().max() < TOL
        seq = list(ids)
        for _ in range(steps):
            seq.append(int(ref[-1].argmax()))
            ref = hf(torch.tensor([seq])).logits[0]
            out = _feed(model, cache, slot, seq[-1:], rows="last")
            assert (out.logits[0] - ref[-1]).abs().max() < TOL


def test_smollm2_matches_transformers(smollm2, smollm2_hf):
    model, tokenizer = smollm2
    assert (model.config.num_layers, model.config.hidden_size, model.config.num_heads,
            model.config.num_kv_heads, model.config.vocab_size) == (30, 576, 9, 3, 49152)
    ids = tokenizer("The quick brown fox jumps over the lazy dog because")["input_ids"]
    _check_prefill_and_steps(model, smollm2_hf, ids)


def test_smollm2_taps_are_raw_layer_outputs(smollm2, smollm2_hf):
    model, tokenizer = smollm2
    ids = tokenizer("Speculative decoding drafts tokens")["input_ids"]
    cache = KVCache(model.config, num_slots=1, max_seq_len=64)
    taps = [-1, 0, 7, 28]
    with torch.no_grad():
        hidden = smollm2_hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
        out = _feed(model, cache, cache.allocate(), ids, taps=taps)
    expected = torch.cat([hidden[l + 1][0] for l in taps], dim=-1)
    assert out.taps.shape == (len(ids), len(taps) * 576)
    assert (out.taps - expected).abs().max() < TOL


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A random Qwen3 saved by transformers in sharded safetensors, and that transformers model."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=5)
    hf = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # q/k norms initialise to ones; make them matter
        for layer in hf.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(path, max_shard_size="100KB")
    _save_tokenizer(path)
    return path, hf


def _save_tokenizer(path):
    """A tiny word-level tokenizer so the directory is a complete model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w5").save_pretrained(path)


def test_qwen3_sharded_matches_transformers(tiny_qwen3):
    path, hf = tiny_qwen3
    assert (path / "model.safetensors.index.json").is_file()
    model, _ = load_target(str(path))
    assert model.config.arch == "qwen3" and model.config.qk_norm
    assert 5 in model.config.eos_token_ids
    _check_prefill_and_steps(model, hf, [3, 17, 42, 8, 91, 23, 4], steps=5)


def test_ragged_batch_equals_each_request_alone(tiny_qwen3):
    model, _ = load_target(str(tiny_qwen3[0]))
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14]]
    alone = []
    for p in prompts:
        cache = KVCache(model.config, num_slots=1, max_seq_len=64)
        alone.append(_feed(model, cache, cache.allocate(), p, taps=[0, 1]))
    cache = KVCache(model.config, num_slots=4, max_seq_len=64)
    slots = [cache.allocate() for _ in prompts]
    cache.free(slots[0])  # slots need not be contiguous or in order
    slots[0] = cache.allocate()
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    out = model(ids, positions, torch.tensor(slots), torch.tensor([len(p) for p in prompts]), cache,
                tap_layers=[0, 1], logits_rows="all")
    assert (out.logits - torch.cat([a.logits for a in alone])).abs().max() < 1e-5
    assert (out.taps - torch.cat([a.taps for a in alone])).abs().max() < 1e-5
    # then one more ragged step (2, 1, 3 new tokens) against each request alone continuing
    new = [[20, 21], [22], [23, 24, 25]]
    out = model(torch.tensor([t for n in new for t in n]),
                torch.cat([torch.arange(len(p), len(p) + len(n)) for p, n in zip(prompts, new)]),
                torch.tensor(slots), torch.tensor([len(n) for n in new]), cache, logits_rows="last")
    for r, (p, n) in enumerate(zip(prompts, new)):
        cache1 = KVCache(model.config, num_slots=1, max_seq_len=64)
        ref = _feed(model, cache1, cache1.allocate(), p + n, rows="last")
        assert (out.logits[r] - ref.logits[0]).abs().max() < 1e-5


def test_fresh_sequences_without_a_cache_equal_the_cached_ragged_batch(tiny_qwen3):
    """cache=None (one padded causal attention call per layer, training's feature forward) gives each row the
    logits and taps of the ragged batch appended to empty slots; positions must then count from 0."""
    model, _ = load_target(str(tiny_qwen3[0]))
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14], [15]]
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    cache = KVCache(model.config, num_slots=4, max_seq_len=16)
    slots = torch.tensor([cache.allocate() for _ in prompts])
    with torch.no_grad():
        cached = model(ids, positions, slots, lens, cache, tap_layers=[0, 1], logits_rows="all")
        fresh = model(ids, positions, None, lens, None, tap_layers=[0, 1], logits_rows="all")
    torch.testing.assert_close(fresh.logits, cached.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh.taps, cached.taps, atol=1e-5, rtol=1e-5)
    with pytest.raises(DSparkError, match="count from 0"):
        model(ids, positions + 1, None, lens, None)


def test_batched_decode_equals_the_ragged_decode(tiny_qwen3):
    """A cache with batched_decode runs passes of one token per request as one masked attention call per layer
    (slots out of order, contexts of different lengths); the logits, taps and cache rows are the ragged path's
    within rounding, and passes of more tokens keep the ragged path."""
    model, _ = load_target(str(tiny_qwen3[0]))
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14]]
    caches, outputs = [], []
    for batched in (False, True):
        cache = KVCache(model.config, num_slots=4, max_seq_len=32, batched_decode=batched)
        slots = [3, 0, 2]
        for slot in slots:
            cache.lengths[slot] = 0
        with torch.no_grad():
            model(torch.tensor([t for p in prompts for t in p]), torch.cat([torch.arange(len(p)) for p in prompts]),
                  torch.tensor(slots), torch.tensor([len(p) for p in prompts]), cache)
            steps = []
            for step in range(3):
                starts = cache.lengths[torch.tensor(slots)]
                steps.append(model(torch.tensor([20 + step, 30 + step, 40 + step]), starts.clone(), torch.tensor(slots),
                                   torch.ones(3, dtype=torch.long), cache, tap_layers=[0, 1], logits_rows="all"))
        caches.append(cache)
        outputs.append(steps)
    for ragged, batched in zip(*outputs):
        torch.testing.assert_close(batched.logits, ragged.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.taps, ragged.taps, atol=1e-5, rtol=1e-5)
    for layer in range(model.config.num_layers):
        torch.testing.assert_close(caches[1].k[layer][:, :, :10], caches[0].k[layer][:, :, :10], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[1].v[layer][:, :, :10], caches[0].v[layer][:, :, :10], atol=1e-5, rtol=1e-5)
    assert caches[1].lengths[torch.tensor([3, 0, 2])].tolist() == [10, 5, 7]


def test_rollback_then_refeed_equals_never_fed(tiny_qwen3):
    model, _ = load_target(str(tiny_qwen3[0]))
    cache = KVCache(model.config, num_slots=1, max_seq_len=64)
    slot = cache.allocate()
    _feed(model, cache, slot, [1, 2, 3, 4])
    _feed(model, cache, slot, [50, 51, 52])  # drafts that get rejected
    cache.set_length(slot, 5)  # keep the first of them
    rolled = _feed(model, cache, slot, [60, 61])
    fresh_cache = KVCache(model.config, num_slots=1, max_seq_len=64)
    fresh = _feed(model, fresh_cache, fresh_cache.allocate(), [1, 2, 3, 4, 50, 60, 61])
    assert (rolled.logits - fresh.logits[-2:]).abs().max() < 1e-5
    with pytest.raises(DSparkError, match="cannot set length"):
        cache.set_length(slot, 10)


def test_positions_must_continue_the_cache(tiny_qwen3):
    model, _ = load_target(str(tiny_qwen3[0]))
    cache = KVCache(model.config, num_slots=1, max_seq_len=8)
    slot = cache.allocate()
    with pytest.raises(DSparkError, match="positions must continue"):
        model(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([slot]), torch.tensor([2]), cache)
    with pytest.raises(DSparkError, match="exceed the cache limit"):
        _feed(model, cache, slot, list(range(9)))
    with pytest.raises(DSparkError, match="all 1 slots are in use"):
        cache.allocate()


def test_unsupported_architecture_and_missing_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        load_target(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_target(str(tmp_path / "nope"))
