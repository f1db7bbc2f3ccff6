"""The exported drafter graphs on ONNX Runtime against DeepSpec's reference outputs and the torch drafter."""
import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, tiny_drafter, tiny_target
from dspark_trt import load_drafter
from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter
from dspark_trt.export.draft_graph import block_inputs, export_drafter
from dspark_trt.export.ort_session import make_session, run

FIXTURE = SHARED / "fixtures" / "deepspec" / "qwen3_vanilla_b7"
TOL = 1e-4


def _sessions(drafter, tmp_path):
    paths = export_drafter(drafter, tmp_path)
    for path in paths.values():
        onnx.checker.check_model(str(path), full_check=True)
    return {name: make_session(p) for name, p in paths.items()}


class Contexts:
    """The runtime's view: per-slot context K/V in numpy, filled by the draft_context graph."""

    def __init__(self, drafter, slots=2, max_len=64):
        cfg = drafter.config
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.lens = np.zeros(slots, np.int64)

    def extend(self, session, slot, features):
        n, start = len(features), self.lens[slot]
        positions = np.arange(start, start + n)
        k, v = session.run(None, {"features": features.numpy(), "positions": positions})
        self.k[:, slot, :, positions], self.v[:, slot, :, positions] = k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3)
        self.lens[slot] += n


def test_deepspec_fixture_two_rounds(tmp_path):
    drafter = load_drafter(FIXTURE)
    ref = load_file(FIXTURE / "reference_io.safetensors")
    s = _sessions(drafter, tmp_path)
    assert set(s) == {"draft_context", "draft_block", "draft_markov_step", "draft_confidence"}
    ctx, state = Contexts(drafter), drafter.new_state()
    for i in range(2):
        features, anchor = ref[f"round{i}.ctx"], int(ref[f"round{i}.anchor"])
        ctx.extend(s["draft_context"], 0, features)
        with torch.no_grad():
            drafter.extend_context(state, features)
        for layer in range(drafter.config.num_hidden_layers):  # the cache equals the torch drafter's
            assert np.abs(ctx.k[layer, 0, :, :state.length] - state.keys[layer].numpy()).max() < TOL
            assert np.abs(ctx.v[layer, 0, :, :state.length] - state.values[layer].numpy()).max() < TOL
        assert ctx.lens[0] == int(ref[f"round{i}.anchor_position"])
        hidden, base = s["draft_block"].run(None, block_inputs([anchor], ctx.lens[:1], ctx.k, ctx.v, [0]))
        assert np.abs(hidden[0] - ref[f"round{i}.block_hidden"].numpy()).max() < TOL
        assert np.abs(base[0] - ref[f"round{i}.base_logits"].numpy()).max() < TOL
        tokens = ref[f"round{i}.greedy_tokens"].numpy()
        prevs = np.concatenate([[anchor], tokens[:-1]])
        for k in range(drafter.config.block_size):  # the greedy loop, fed the reference prefix
            (bias,) = run(s["draft_markov_step"], {"prev": prevs[k:k + 1], "hidden": hidden[:, k]})
            logits = base[0, k] + bias[0]
            assert np.abs(logits - ref[f"round{i}.greedy_logits"][k].numpy()).max() < TOL
            assert logits.argmax() == tokens[k]
        (conf,) = run(s["draft_confidence"], {"hidden": hidden, "prev_tokens": prevs[None]})
        assert np.abs(conf[0] - ref[f"round{i}.confidence_logits"].numpy()).max() < TOL


@pytest.mark.parametrize("head", ["gated", "rnn"])
def test_batch_of_two_matches_torch(head, tmp_path):
    target = tiny_target(vocab_size=24, num_layers=2)
    drafter = tiny_drafter(target, block_size=4, seed=2, markov_head_type=head)
    s = _sessions(drafter, tmp_path)
    ctx, states = Contexts(drafter), [drafter.new_state(), drafter.new_state()]
    g = torch.Generator().manual_seed(0)
    for n_new in ([5, 2], [1, 3]):  # two rounds: the second over a non-empty context cache
        features = [torch.randn(n, 2 * 16, generator=g) for n in n_new]
        for slot, f in enumerate(features):
            ctx.extend(s["draft_context"], slot, f)
        anchors = torch.tensor([3, 7])
        ref = drafter.draft_batch(states, features, anchors, torch.zeros(2), torch.zeros(2, dtype=torch.long),
                                  torch.ones(2), None)
        hidden, base = s["draft_block"].run(None, block_inputs(anchors, ctx.lens, ctx.k, ctx.v, [0, 1]))
        assert np.abs(hidden - ref.block_hidden.numpy()).max() < TOL
        assert np.abs(base - ref.base_logits.numpy()).max() < TOL
        prevs = torch.cat([anchors[:, None], ref.tokens[:, :-1]], dim=1)
        state = np.zeros((2, drafter.config.markov_rank), np.float32)
        for k in range(drafter.config.block_size):
            feeds = {"prev": prevs[:, k].numpy(), "hidden": hidden[:, k]}
            if head == "rnn":
                feeds["state"] = state
            bias, *rest = run(s["draft_markov_step"], feeds)
            state = rest[0] if rest else state
            assert np.abs(base[:, k] + bias - ref.logits[:, k].numpy()).max() < TOL
        (conf,) = run(s["draft_confidence"], {"hidden": hidden, "prev_tokens": prevs.numpy()})
        assert np.abs(conf - ref.confidence_logits.numpy()).max() < TOL


def test_heads_absent_means_graphs_absent(tmp_path):
    target = tiny_target(vocab_size=16)
    cfg = drafter_config_for_target(target.config, block_size=3, target_layer_ids=[0], markov_rank=0,
                                    enable_confidence_head=False, mask_token_id=15)
    drafter = random_drafter(cfg)
    assert set(export_drafter(drafter, tmp_path)) == {"draft_context", "draft_block"}
