"""The drafter against DeepSpec's reference outputs and against a from-the-spec re-implementation."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dspark_trt import load_drafter
from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter
from dspark_trt.models.target import TargetConfig

from conftest import SHARED

FIXTURE = SHARED / "fixtures" / "deepspec" / "qwen3_vanilla_b7"


def test_deepspec_fixture_two_rounds():
    drafter = load_drafter(FIXTURE)
    ref = load_file(FIXTURE / "reference_io.safetensors")
    state = drafter.new_state()
    for i in range(2):
        out = drafter.draft(state, ref[f"round{i}.ctx"], int(ref[f"round{i}.anchor"]), temperature=0.0)
        assert state.length == int(ref[f"round{i}.anchor_position"])
        for name, value in [("block_hidden", out.block_hidden), ("base_logits", out.base_logits),
                            ("greedy_logits", out.logits), ("confidence_logits", out.confidence_logits)]:
            assert (value - ref[f"round{i}.{name}"]).abs().max() < 1e-5, name
        assert out.tokens.tolist() == ref[f"round{i}.greedy_tokens"].tolist()


# ---- an independent re-implementation straight from DSPARK_SPEC.md sections 1-2 ------------------
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_draft(sd, cfg, all_ctx, anchor):
    """Full recompute from all context features, plain loops, greedy."""
    eps, theta, B = cfg.rms_norm_eps, cfg.rope_theta, cfg.block_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    p = all_ctx.shape[0]
    c = _rms(all_ctx @ sd["fc.weight"].T, sd["hidden_norm.weight"], eps)
    x = sd["embed_tokens.weight"][torch.tensor([anchor] + [cfg.mask_token_id] * (B - 1))]
    pos_ctx, pos_blk = torch.arange(p), torch.arange(p, p + B)
    for i in range(cfg.num_hidden_layers):
        g = lambda n: sd[f"layers.{i}.{n}"]  # noqa: E731
        a = _rms(x, g("input_layernorm.weight"), eps)
        q = _rope(_rms((a @ g("self_attn.q_proj.weight").T).view(B, nh, hd), g("self_attn.q_norm.weight"), eps),
                  pos_blk, theta)
        kv_in = torch.cat([c, a])
        k = _rms((kv_in @ g("self_attn.k_proj.weight").T).view(-1, nkv, hd), g("self_attn.k_norm.weight"), eps)
        k = _rope(k, torch.cat([pos_ctx, pos_blk]), theta)
        v = (kv_in @ g("self_attn.v_proj.weight").T).view(-1, nkv, hd)
        out = torch.zeros(B, nh, hd)
        for h in range(nh):
            kh = h // (nh // nkv)
            w = torch.softmax(q[:, h] @ k[:, kh].T / math.sqrt(hd), -1)
            out[:, h] = w @ v[:, kh]
        x = x + out.reshape(B, -1) @ g("self_attn.o_proj.weight").T
        hmid = _rms(x, g("post_attention_layernorm.weight"), eps)
        x = x + (F.silu(hmid @ g("mlp.gate_proj.weight").T) * (hmid @ g("mlp.up_proj.weight").T)) @ \
            g("mlp.down_proj.weight").T
    h = _rms(x, sd["norm.weight"], eps)
    U = h @ sd["lm_head.weight"].T
    prev, state, toks, logits, prevs = anchor, torch.zeros(cfg.markov_rank), [], [], []
    for k_ in range(B):
        l = U[k_].clone()
        if cfg.markov_rank:
            e = sd["markov_head.markov_w1.weight"][prev]
            w2 = sd["markov_head.markov_w2.weight"]
            if cfg.markov_head_type == "vanilla":
                l += w2 @ e
            elif cfg.markov_head_type == "gated":
                gate = torch.sigmoid(sd["markov_head.gate_proj.weight"] @ torch.cat([h[k_], e])
                                     + sd["markov_head.gate_proj.bias"])
                l += w2 @ (gate * e)
            else:
                z = torch.cat([state, e, h[k_]])
                j = sd["markov_head.joint_proj.weight"] @ z + sd["markov_head.joint_proj.bias"]
                gr, cr, orr = j.chunk(3)
                gg = torch.sigmoid(gr)
                l += w2 @ torch.tanh(orr)
                state = gg * state + (1 - gg) * torch.tanh(cr)
        tok = int(l.argmax())
        prevs.append(prev)
        toks.append(tok)
        logits.append(l)
        prev = tok
    conf = None
    if cfg.enable_confidence_head:
        feats = h
        if cfg.confidence_head_with_markov and cfg.markov_rank:
            feats = torch.cat([h, sd["markov_head.markov_w1.weight"][torch.tensor(prevs)]], -1)
        conf = feats @ sd["confidence_head.proj.weight"][0] + sd["confidence_head.proj.bias"][0]
    return toks, torch.stack(logits), U, conf


TINY_TARGET = TargetConfig(arch="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=6,
                           num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                           max_position_embeddings=256, tie_word_embeddings=True, eos_token_ids=[1])

VARIANTS = {
    "gated": dict(markov_head_type="gated", markov_rank=8),
    "rnn": dict(markov_head_type="rnn", markov_rank=8),
    "no_markov": dict(markov_rank=0, enable_confidence_head=False),
    "conf_without_markov": dict(markov_head_type="vanilla", markov_rank=8, confidence_head_with_markov=False),
    "embedding_tap": dict(markov_head_type="vanilla", markov_rank=8, target_layer_ids=[-1, 2, 4]),
}


def _scale_up(drafter, seed):
    """Random weights large enough that attention and the heads matter (0.02 init is near-uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return drafter


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_spec_reimplementation(variant):
    cfg = drafter_config_for_target(TINY_TARGET, block_size=5, num_draft_layers=2, mask_token_id=60,
                                    **VARIANTS[variant])
    drafter = _scale_up(random_drafter(cfg, seed=1), seed=2)
    sd = {k: v.float() for k, v in drafter.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(11, cfg.num_taps * cfg.hidden_size, generator=g)
    state = drafter.new_state()
    for lo, hi, anchor in [(0, 6, 7), (6, 11, 23)]:  # two rounds with an incremental context cache
        out = drafter.draft(state, ctx[lo:hi], anchor)
        toks, logits, base, conf = reference_draft(sd, cfg, ctx[:hi], anchor)
        assert (out.base_logits - base).abs().max() < 1e-4
        assert (out.logits - logits).abs().max() < 1e-4
        assert out.tokens.tolist() == toks
        if conf is None:
            assert out.confidence_logits is None
        else:
            assert (out.confidence_logits - conf).abs().max() < 1e-4


def test_batch_equals_single_and_sampling_uses_returned_probs():
    cfg = drafter_config_for_target(TINY_TARGET, block_size=4, num_draft_layers=2, mask_token_id=60,
                                    markov_rank=8)
    drafter = _scale_up(random_drafter(cfg, seed=5), seed=6)
    g = torch.Generator().manual_seed(7)
    ctxs = [torch.randn(n, cfg.num_taps * cfg.hidden_size, generator=g) for n in (3, 9, 1)]
    anchors = torch.tensor([4, 9, 33])
    temps, top_k, top_p = torch.tensor([0.0, 1.0, 0.7]), torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 0.8])
    u = torch.rand(3, 4, generator=g, dtype=torch.float64)
    states = [drafter.new_state() for _ in ctxs]
    batch = drafter.draft_batch(states, ctxs, anchors, temps, top_k, top_p, u)
    for i in range(3):
        single = drafter.draft_batch([drafter.new_state()], [ctxs[i]], anchors[i:i + 1], temps[i:i + 1],
                                     top_k[i:i + 1], top_p[i:i + 1], u[i:i + 1])
        assert (batch.logits[i] - single.logits[0]).abs().max() < 1e-5
        assert batch.tokens[i].tolist() == single.tokens[0].tolist()
    # every drawn token has positive probability under the q returned with it; greedy q is one-hot
    picked = batch.probs.gather(2, batch.tokens.unsqueeze(2)).squeeze(2)
    assert bool((picked > 0).all())
    assert torch.equal(batch.probs[0].max(-1).values, torch.ones(4))
    assert int((batch.probs[1] > 0).sum(-1).max()) <= 5  # top-k 5


def test_context_given_at_once_equals_given_in_pieces():
    cfg = drafter_config_for_target(TINY_TARGET, block_size=3, num_draft_layers=2, mask_token_id=60,
                                    markov_rank=8, markov_head_type="rnn")
    drafter = _scale_up(random_drafter(cfg, seed=8), seed=9)
    ctx = torch.randn(10, cfg.num_taps * cfg.hidden_size, generator=torch.Generator().manual_seed(10))
    once = drafter.draft(drafter.new_state(), ctx, 5)
    state = drafter.new_state()
    drafter.extend_context(state, ctx[:4])
    drafter.extend_context(state, ctx[4:7])
    pieces = drafter.draft(state, ctx[7:], 5)
    assert (once.logits - pieces.logits).abs().max() < 1e-5
    assert state.length == 10  # the block's own K/V were not kept
    with pytest.raises(ValueError, match="width"):
        drafter.draft(state, torch.zeros(1, 7), 5)
