"""Shared fixtures: the real default model is loaded once per test session (it takes seconds)."""
import contextlib
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # ../shared beside the checkout
if not SHARED.is_dir():
    raise RuntimeError(f"the project's shared data is missing: expected {SHARED} beside the checkout")


@pytest.fixture(scope="session")
def smollm2():
    """(our TargetModel, tokenizer) for the default GGUF."""
    from dspark_trt.models.weights import load_target

    return load_target("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own model loaded from the same GGUF (the parity reference)."""
    from transformers import AutoModelForCausalLM

    from dspark_trt.models.sources import resolve_model

    source = resolve_model("smollm2")
    return AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                                dtype=torch.float32).eval()


def tiny_target(vocab_size: int = 8, seed: int = 0, num_layers: int = 2, scale: float = 1.0):
    """A random Llama-style TargetModel small enough for thousands of statistical samples.

    `scale` multiplies the output logits' spread: larger = more peaked next-token distributions.
    """
    from dspark_trt.models.target import TargetConfig, TargetModel

    config = TargetConfig(arch="llama", vocab_size=vocab_size, hidden_size=16, intermediate_size=24,
                          num_layers=num_layers, num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6,
                          rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
                          eos_token_ids=[])
    torch.manual_seed(seed)
    model = TargetModel(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model.eval()


def tiny_drafter(target, block_size: int, seed: int = 0, draft_ids: list[int] | None = None, **overrides):
    """A random-weight DSpark drafter fitted to a tiny target (its own, unrelated predictions), over the
    target tokens draft_ids (a reduced draft vocabulary) when given."""
    from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter

    cfg = drafter_config_for_target(target.config, block_size=block_size, num_draft_layers=1,
                                    target_layer_ids=[0, 1], markov_rank=4,
                                    mask_token_id=target.config.vocab_size - 1,
                                    draft_vocab_size=len(draft_ids) if draft_ids else None, **overrides)
    drafter = random_drafter(cfg, seed=seed, draft_ids=torch.tensor(draft_ids) if draft_ids else None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # spread the draft distribution so it is neither uniform nor one-hot
        drafter.lm_head.weight.copy_(torch.randn(drafter.lm_head.weight.shape, generator=g) * 2)
    return drafter


def chi_square_p_value(counts, expected_probs, min_expected: float = 5.0) -> float:
    """Goodness-of-fit p-value; cells with expected count below min_expected are pooled."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    expected = torch.as_tensor(expected_probs, dtype=torch.float64) * counts.sum()
    small = expected < min_expected
    if bool(small.any()):
        counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    stat = float(((counts - expected) ** 2 / expected.clamp(min=1e-12)).sum())
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@contextlib.contextmanager
def packaged_server(engines, root: Path, **package_options):
    """A real tritonserver serving engine directory `engines` packaged under root (PackageOptions fields
    as keywords); stopped on exit. For module-scoped server fixtures."""
    from dspark_trt.serving.package import PackageOptions, package_repository
    from dspark_trt.serving.tritonserver import TritonServer

    repo = package_repository(PackageOptions(engines=str(engines), out=str(root / "repo"), **package_options))
    with TritonServer(repo, workdir=root / "work") as running:
        yield running
