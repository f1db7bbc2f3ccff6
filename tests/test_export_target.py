"""The exported target step graph on ONNX Runtime against the torch TargetModel."""
import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_target
from dspark_trt.errors import DSparkError
from dspark_trt.export.target_graph import export_target
from dspark_trt.graphs.ort_session import make_session
from dspark_trt.graphs.target_graph import step_inputs
from dspark_trt.graphs.verify_tail import verify_feeds
from dspark_trt.models.target import TargetConfig, TargetModel
from dspark_trt.runtimes.kv_cache import KVCache

TOL = 1e-4


def _close(actual, expected):
    """Max abs error < TOL relative to the magnitude: over 30 layers float32 rounding grows with it
    (SmolLM2: logits around 25 differ by up to 2e-4, its residual stream reaches the hundreds)."""
    return np.abs(actual - expected).max() < TOL * max(1.0, float(np.abs(expected).max()))


def tiny_qwen3():
    config = TargetConfig(arch="qwen3", vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=3,
                          num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6,
                          max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = TargetModel(config).eval()
    with torch.no_grad():  # random norm weights so QK-norm is exercised beyond the identity
        for layer in model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def _stack(cache):
    return np.stack([k.numpy() for k in cache.k]), np.stack([v.numpy() for v in cache.v])


def _check_pass(model, session, cache, slots, lens, taps, rng):
    """One ragged pass on both; compares logits of every row, taps and the new K/V rows. The verify
    tail, fed every other row (last first) as a greedy request without drafts, returns their argmax."""
    cfg = model.config
    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, sum(lens)))
    starts = cache.lengths[slots].clone()
    past_k, past_v = _stack(cache)
    inputs = step_inputs(ids.numpy(), slots, starts.numpy(), lens, past_k, past_v, "all")
    rows = np.arange(sum(lens))[::-2]
    n = rows.size
    greedy = verify_feeds(rows, np.zeros(0), np.zeros((0, cfg.vocab_size)), np.arange(n + 1), np.zeros(n),
                          np.zeros(n), np.ones(n), np.zeros(n))
    logits, new_k, new_v, *rest, accepted, next_token = session.run(None, inputs.feeds | greedy)
    positions = torch.cat([torch.arange(int(s), int(s) + n) for s, n in zip(starts, lens)])
    with torch.no_grad():
        ref = model(ids, positions, torch.tensor(slots), torch.tensor(lens), cache, tap_layers=taps,
                    logits_rows="all")
    assert _close(logits, ref.logits.numpy())
    assert (logits.argmax(-1) == ref.logits.numpy().argmax(-1)).all()
    assert (accepted == 0).all() and (next_token == ref.logits.numpy()[rows].argmax(-1)).all()
    if taps:
        assert _close(rest[0], ref.taps.numpy())
    ref_k, ref_v = _stack(cache)
    rows = (slice(None), inputs.row_slot_ids, slice(None), inputs.row_positions)
    assert _close(new_k, ref_k[rows].transpose(1, 0, 2, 3))
    assert _close(new_v, ref_v[rows].transpose(1, 0, 2, 3))


def _check_model(model, tmp_path, taps):
    _check_graph(model, export_target(model, tmp_path / "target.onnx", tap_layers=taps), taps)


def _check_graph(model, path, taps):
    onnx.checker.check_model(str(path), full_check=True)
    session = make_session(path)
    cache = KVCache(model.config, num_slots=4, max_seq_len=64)
    slots = [cache.allocate() for _ in range(3)]
    rng = np.random.default_rng(0)
    _check_pass(model, session, cache, slots, [5, 1, 9], taps, rng)  # prefill from an empty cache
    _check_pass(model, session, cache, slots[:2], [1, 4], taps, rng)  # ragged over a non-empty cache
    _check_pass(model, session, cache, [slots[2], slots[0]], [3, 1], taps, rng)  # slots out of order
    cache.set_length(slots[1], 2)  # rollback: later positions are masked, then overwritten
    _check_pass(model, session, cache, [slots[1]], [2], taps, rng)


def test_tiny_llama_matches_torch(tmp_path):
    _check_model(tiny_target(vocab_size=32, num_layers=3), tmp_path, taps=[-1, 1])


def test_tiny_qwen3_matches_torch(tmp_path):
    _check_model(tiny_qwen3(), tmp_path, taps=[0, 2])


def test_no_taps_graph_has_no_tap_output(tmp_path):
    path = export_target(tiny_target(vocab_size=16), tmp_path / "t.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits", "new_k", "new_v", "accepted",
                                                                   "next_token"]
    path = export_target(tiny_target(vocab_size=16), tmp_path / "plain.onnx", verify=False)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits", "new_k", "new_v"]


def test_bad_inputs_are_named():
    cache = np.zeros((1, 2, 1, 8, 4), dtype=np.float32)
    with pytest.raises(DSparkError, match="sum to 3"):
        step_inputs([1, 2, 3], [0], [0], [2], cache, cache)
    with pytest.raises(DSparkError, match="cache limit 8"):
        step_inputs([1, 2, 3], [0], [6], [3], cache, cache)
    with pytest.raises(DSparkError, match="strictly increasing"):
        export_target(tiny_target(), "/tmp/never.onnx", tap_layers=[1, 0])


@pytest.mark.slow
def test_smollm2_matches_torch(smollm2, smollm2_portable_engines):
    """The target graph export_engines wrote (export_target with its drafter's taps)."""
    model, _ = smollm2
    engines, drafter = smollm2_portable_engines
    _check_graph(model, engines / "target.onnx", drafter.config.target_layer_ids)
