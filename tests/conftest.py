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


@contextlib.contextmanager
def smollm2_loaded_once(smollm2):
    """While open, the commands under test that load the target by name get the session's `smollm2` (a second
    load from the GGUF takes about 12 s on 2 cores; how it loads is tested in test_foundation and
    test_target_model). For commands that only read the target; any other name loads as usual."""
    from dspark_trt.models import weights

    original = weights.load_target

    def load_target(name_or_path, dtype=torch.float32):
        return smollm2 if (name_or_path, dtype) == ("smollm2", torch.float32) else original(name_or_path, dtype)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weights, "load_target", load_target)
        patch.setattr("dspark_trt.engine.factory.load_target", load_target)
        yield


@pytest.fixture(scope="session")
def smollm2_portable_engines(smollm2, tmp_path_factory):
    """(engine directory, drafter): SmolLM2 and a random drafter (block 5) exported as the portable fp32 graphs
    (about 35 s on 2 cores: shared by the graph's check and the runtime's on the real model)."""
    from dspark_trt.export.engines import export_engines
    from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter

    model, _ = smollm2
    drafter = random_drafter(drafter_config_for_target(model.config, block_size=5), seed=0, target=model)
    out = tmp_path_factory.mktemp("smollm2_portable")
    export_engines(model, drafter, out)
    return out, drafter


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


def tiny_drafter(target, block_size: int, seed: int = 0, draft_ids: list[int] | None = None, num_draft_layers: int = 1,
                 **overrides):
    """A random-weight DSpark drafter fitted to a tiny target (its own, unrelated predictions), over the
    target tokens draft_ids (a reduced draft vocabulary) when given."""
    from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter

    cfg = drafter_config_for_target(target.config, block_size=block_size, num_draft_layers=num_draft_layers,
                                    target_layer_ids=[0, 1], markov_rank=4,
                                    mask_token_id=target.config.vocab_size - 1,
                                    draft_vocab_size=len(draft_ids) if draft_ids else None, **overrides)
    drafter = random_drafter(cfg, seed=seed, draft_ids=torch.tensor(draft_ids) if draft_ids else None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # spread the draft distribution so it is neither uniform nor one-hot
        drafter.lm_head.weight.copy_(torch.randn(drafter.lm_head.weight.shape, generator=g) * 2)
    return drafter


def next_logits(target, seq: list[int]) -> torch.Tensor:
    """The target's raw logits [1, V] for the token after seq, from a fresh cache."""
    from dspark_trt.runtimes.kv_cache import KVCache

    cache = KVCache(target.config, num_slots=1, max_seq_len=len(seq) + 1)
    slot = cache.allocate()
    with torch.no_grad():
        return target(torch.tensor(seq), torch.arange(len(seq)), torch.tensor([slot]), torch.tensor([len(seq)]),
                      cache).logits


def oracle_runtime(target, block_size: int, num_slots: int = 8, max_seq_len: int = 128):
    """A TorchRuntime whose "drafter" is the target itself without logit controls: each block is the target's
    own continuation of the slot's tokens (drawn from its warped distribution, which is q). Drafts are accepted
    wherever the controls leave the target's choice alone and rejected where they change it, so verification
    under controls runs at every block position (random tiny drafters are rarely accepted)."""
    from dspark_trt.models.drafter import DraftStep
    from dspark_trt.runtimes.kv_cache import KVCache
    from dspark_trt.runtimes.torch_runtime import TorchRuntime
    from dspark_trt.spec.sampling import sample_from_uniform, warp_probs

    class OracleRuntime(TorchRuntime):
        def __init__(self):
            super().__init__(target, None, num_slots=num_slots, max_seq_len=max_seq_len)
            self.block_size = block_size
            self.tokens: dict[int, list[int]] = {}  # each slot's tokens, as its cache holds them

        def target_forward(self, input_ids, slots, query_lens, logits_rows):
            for slot, ids in zip(slots.tolist(), torch.split(input_ids, query_lens.tolist())):
                self.tokens[slot] = self.tokens.get(slot, [])[: self.cache_length(slot)] + ids.tolist()
            return super().target_forward(input_ids, slots, query_lens, logits_rows)

        def draft(self, slots, new_features, anchors, temperature, top_k, top_p, uniforms):
            seqs = [self.tokens[s][: self.cache_length(s)] + [int(a)] for s, a in zip(slots.tolist(), anchors)]
            n, lens = len(seqs), torch.tensor([len(s) for s in seqs])
            cache = KVCache(target.config, num_slots=n, max_seq_len=int(lens.max()) + block_size)
            rows = torch.tensor([cache.allocate() for _ in range(n)])
            ids, positions = torch.tensor([t for s in seqs for t in s]), torch.cat([torch.arange(m) for m in lens])
            tokens, probs = [], []
            with torch.no_grad():
                for k in range(block_size):  # one batched pass per block position
                    q = warp_probs(target(ids, positions, rows, lens, cache).logits, temperature, top_k, top_p)
                    ids = sample_from_uniform(q, uniforms[:, k])
                    tokens.append(ids)
                    probs.append(q)
                    positions, lens = cache.lengths[rows].clone(), torch.ones(n, dtype=torch.long)
            return DraftStep(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1), confidence_logits=None)

    return OracleRuntime()


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
