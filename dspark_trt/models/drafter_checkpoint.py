"""DeepSpec checkpoint I/O: config.json + (sharded) safetensors, keys without a `model.` prefix.

Released `deepseek-ai/dspark_*` / `dflash_*` drafters load unchanged, and drafters we train are
written in the same format so DeepSpec-compatible tools read them.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from dspark_trt.errors import ModelNotFoundError, UnsupportedModelError
from dspark_trt.models.drafter import DrafterConfig, DSparkDrafter
from dspark_trt.models.layers import rope_theta
from dspark_trt.models.markov_heads import MARKOV_HEAD_TYPES
from dspark_trt.models.sources import read_safetensors_dir

REQUIRED_FIELDS = ("target_layer_ids", "mask_token_id", "block_size", "num_anchors", "enable_confidence_head",
                   "markov_rank", "num_target_layers", "hidden_size", "vocab_size", "num_hidden_layers")
SUPPORTED_ARCHITECTURES = ("Qwen3DSparkModel",)

# SmolLM2's `<empty_output>` (id 16): a special token of its code pre-training (an empty Jupyter
# output marker) that chat text never contains, so it plays the role of Qwen3's untrained padding
# row 151669 as the block's mask token.
SMOLLM2_MASK_TOKEN_ID = 16

# Our extension of the DeepSpec config: the checkpoint omits embed_tokens/lm_head because they are
# frozen copies of the target's (spec 1.6), which keeps a shipped drafter small; loading then needs
# the target. DeepSpec's own loader does not know this key.
SHARES_TARGET_EMBEDDINGS = "dspark_trt_shares_target_embeddings"
TARGET_TENSORS = ("embed_tokens.weight", "lm_head.weight")
DRAFTERS_DIR = Path(__file__).resolve().parent.parent / "drafters"
PACKAGED_DRAFTERS = {"default": DRAFTERS_DIR / "smollm2"}
CALIBRATION_FILE = "calibration.json"  # stored next to the drafter by `dspark-trt calibrate`


def resolve_drafter(name_or_path: str | Path) -> Path:
    """A drafter directory: a packaged name ('default': the SmolLM2 drafter we ship) or a path."""
    return PACKAGED_DRAFTERS.get(str(name_or_path), Path(name_or_path))


def stored_calibration(draft: str | Path | None) -> Path | None:
    """The calibration stored next to a drafter (a directory or a packaged name), if there is one."""
    path = resolve_drafter(draft) / CALIBRATION_FILE if draft is not None else None
    return path if path is not None and path.is_file() else None


def config_from_dict(raw: dict, where: str = "config.json") -> DrafterConfig:
    """Validate a DeepSpec config dict and extract the drafter's fields."""
    arch = (raw.get("architectures") or ["Qwen3DSparkModel"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{where}: drafter architecture '{arch}' is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise UnsupportedModelError(f"{where}: missing required field(s) {', '.join(missing)}")
    rank = int(raw["markov_rank"])
    head_type = raw.get("markov_head_type")
    if rank > 0 and head_type not in MARKOV_HEAD_TYPES:
        raise UnsupportedModelError(f"{where}: markov_rank {rank} needs markov_head_type in {MARKOV_HEAD_TYPES}, "
                                    f"got {head_type!r}")
    if raw["enable_confidence_head"] and "confidence_head_with_markov" not in raw:
        raise UnsupportedModelError(f"{where}: enable_confidence_head needs confidence_head_with_markov")
    taps = [int(t) for t in raw["target_layer_ids"]]
    n_target = int(raw["num_target_layers"])
    if not taps or taps != sorted(set(taps)) or taps[0] < -1 or taps[-1] >= n_target:
        raise UnsupportedModelError(f"{where}: target_layer_ids {taps} must be strictly increasing ids in "
                                    f"[-1, {n_target - 1}]")
    if not 0 <= int(raw["mask_token_id"]) < int(raw["vocab_size"]):
        raise UnsupportedModelError(f"{where}: mask_token_id {raw['mask_token_id']} outside the vocabulary")
    heads = int(raw["num_attention_heads"])
    draft_vocab = raw.get("draft_vocab_size")
    if draft_vocab is not None and not 0 < int(draft_vocab) <= int(raw["vocab_size"]):
        raise UnsupportedModelError(f"{where}: draft_vocab_size {draft_vocab} must be in [1, vocab_size "
                                    f"{raw['vocab_size']}]")
    return DrafterConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(type("Cfg", (), raw)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
        block_size=int(raw["block_size"]),
        mask_token_id=int(raw["mask_token_id"]),
        target_layer_ids=taps,
        num_target_layers=n_target,
        markov_rank=rank,
        markov_head_type=head_type if rank > 0 else None,
        enable_confidence_head=bool(raw["enable_confidence_head"]),
        confidence_head_with_markov=bool(raw.get("confidence_head_with_markov", False)),
        draft_vocab_size=None if draft_vocab is None or int(draft_vocab) == int(raw["vocab_size"]) else int(draft_vocab),
        raw=copy.deepcopy(raw),
    )


def config_to_dict(config: DrafterConfig) -> dict:
    """The DeepSpec config.json: the raw dict (target config copy) with the drafter's fields set."""
    raw = copy.deepcopy(config.raw)
    raw.update({
        "architectures": ["Qwen3DSparkModel"], "model_type": raw.get("model_type", "qwen3"),
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "max_position_embeddings": config.max_position_embeddings, "block_size": config.block_size,
        "mask_token_id": config.mask_token_id, "target_layer_ids": list(config.target_layer_ids),
        "num_target_layers": config.num_target_layers, "num_anchors": raw.get("num_anchors", 512),
        "markov_rank": config.markov_rank, "enable_confidence_head": config.enable_confidence_head,
        "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
    })
    raw.pop("markov_head_type", None)
    raw.pop("confidence_head_with_markov", None)
    raw.pop("draft_vocab_size", None)
    if config.reduced_vocab:
        raw["draft_vocab_size"] = config.draft_vocab_size
    if config.markov_rank > 0:
        raw["markov_head_type"] = config.markov_head_type
    if config.enable_confidence_head:
        raw["confidence_head_with_markov"] = config.confidence_head_with_markov
    return raw


def drafter_config_for_target(target, block_size: int = 7, num_draft_layers: int = 1,
                              target_layer_ids: list[int] | None = None, markov_rank: int = 256,
                              markov_head_type: str = "vanilla", mask_token_id: int = SMOLLM2_MASK_TOKEN_ID,
                              enable_confidence_head: bool = True, confidence_head_with_markov: bool = True,
                              intermediate_size: int | None = None,
                              draft_vocab_size: int | None = None) -> DrafterConfig:
    """A drafter for our TargetConfig: Qwen3-style draft layers with the target's sizes and vocabulary (or
    draft_vocab_size of its tokens)."""
    if target_layer_ids is None:  # spread over the depth, never the last layer (spec 1.2)
        n = target.num_layers
        target_layer_ids = sorted({round(1 + i * (n - 3) / 4) for i in range(5)})
    raw = {"model_type": "qwen3", "num_anchors": 512, "dtype": "float32",
           "bos_token_id": target.bos_token_id, "eos_token_id": target.eos_token_ids}
    raw.update({"vocab_size": target.vocab_size, "hidden_size": target.hidden_size,
                "num_hidden_layers": num_draft_layers, "num_attention_heads": target.num_heads,
                "num_key_value_heads": target.num_kv_heads, "head_dim": target.head_dim,
                "intermediate_size": intermediate_size or target.intermediate_size,
                "rms_norm_eps": target.rms_norm_eps, "rope_parameters": {"rope_theta": target.rope_theta},
                "max_position_embeddings": target.max_position_embeddings, "block_size": block_size,
                "mask_token_id": mask_token_id, "target_layer_ids": target_layer_ids,
                "num_target_layers": target.num_layers, "markov_rank": markov_rank,
                "markov_head_type": markov_head_type if markov_rank > 0 else None,
                "enable_confidence_head": enable_confidence_head,
                "confidence_head_with_markov": confidence_head_with_markov, "draft_vocab_size": draft_vocab_size})
    return config_from_dict(raw, where="drafter config")


def random_drafter(config: DrafterConfig, seed: int = 0, target: nn.Module | None = None,
                   draft_ids: torch.Tensor | None = None) -> DSparkDrafter:
    """HF-style init (normal 0.02, norms at 1); embed/lm_head copied from the target when given (the lm_head's
    rows of the draft vocabulary `draft_ids`, ascending target ids, when the config has a reduced one)."""
    if config.reduced_vocab and draft_ids is None:
        raise ValueError("a drafter with a reduced vocabulary needs its draft_ids")
    generator = torch.Generator().manual_seed(seed)
    model = DSparkDrafter(config)
    if draft_ids is not None:
        model.set_draft_vocab(draft_ids)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        if target is not None:
            model.embed_tokens.weight.copy_(target.embed_tokens.weight)
            model.lm_head.weight.copy_(_head_rows(target.lm_head.weight, model.draft_ids))
    return model.eval()


def init_from(drafter: DSparkDrafter, source: DSparkDrafter) -> None:
    """Copy `source`'s weights into `drafter` (same architecture), the output rows of `drafter`'s draft vocabulary
    taken from `source`'s; `drafter`'s own vocabulary mapping is kept. A token `source` does not predict (a
    draft vocabulary chosen again on more data) keeps `drafter`'s fresh rows: the LM head's is the target's
    (frozen, spec 1.6), the Markov head's a fresh initialisation.

    A `drafter` with more layers than `source` is grown: its extra layers come after `source`'s, fresh but with
    their writes to the residual stream (attention's o_proj, the MLP's down_proj) zero, so the grown drafter
    drafts exactly what `source` did until training moves them."""
    have, want = source.config.num_hidden_layers, drafter.config.num_hidden_layers
    if want < have:
        raise UnsupportedModelError(f"the initial drafter has {have} layers; this drafter has {want} (a drafter can "
                                    f"be grown from fewer layers, not cut)")
    ours, theirs = drafter.state_dict(), source.state_dict()
    tokens = drafter.draft_ids if drafter.draft_ids is not None else torch.arange(drafter.config.vocab_size)
    index = source.to_draft_ids(tokens) if source.draft_ids is not None else tokens
    known = index >= 0  # rows of `drafter` that `source` predicts
    state = {}
    for key, value in ours.items():
        layer = _layer_of(key)
        if key in ("d2t", "t2d"):
            state[key] = value
            continue
        if layer is not None and layer >= have:  # a grown layer
            state[key] = torch.zeros_like(value) if key.endswith(RESIDUAL_WRITES) else value
            continue
        if key not in theirs:
            raise UnsupportedModelError(f"the initial drafter has no tensor '{key}' (another architecture)")
        source_value = theirs[key]
        if key in OUTPUT_ROWS:
            if source_value.shape[1:] != value.shape[1:]:
                raise UnsupportedModelError(f"the initial drafter's '{key}' has shape {tuple(source_value.shape)}; "
                                            f"this drafter needs rows of {tuple(value.shape[1:])}")
            source_value = value.clone()
            source_value[known] = theirs[key][index[known]]
        if source_value.shape != value.shape:
            raise UnsupportedModelError(f"the initial drafter's '{key}' has shape {tuple(theirs[key].shape)}; this "
                                        f"drafter needs {tuple(value.shape)}")
        state[key] = source_value
    drafter.load_state_dict(state)


OUTPUT_ROWS = ("lm_head.weight", "markov_head.markov_w2.weight")  # one row per draft-vocabulary token
RESIDUAL_WRITES = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # what a draft layer adds to its input


def _layer_of(key: str) -> int | None:
    """The draft layer a tensor belongs to ('layers.3.mlp...' -> 3), None outside the layers."""
    parts = key.split(".", 2)
    return int(parts[1]) if parts[0] == "layers" else None


def _head_rows(weight: torch.Tensor, draft_ids: torch.Tensor | None) -> torch.Tensor:
    """The target LM head's rows that the drafter predicts."""
    return weight if draft_ids is None else weight[draft_ids]


def load_drafter(path: str | Path, dtype: torch.dtype = torch.float32, target: nn.Module | None = None) -> DSparkDrafter:
    """Load a DeepSpec drafter directory (or 'default'); any key/shape mismatch names the first offending tensor.

    A checkpoint saved with share_target_embeddings takes embed_tokens/lm_head from `target`.
    """
    path = resolve_drafter(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"drafter '{path}': no config.json (expected a DeepSpec checkpoint directory)")
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as exc:
        raise UnsupportedModelError(f"{config_path}: not valid JSON ({exc})") from exc
    config = config_from_dict(raw, where=str(config_path))
    state = read_safetensors_dir(path)
    if raw.get(SHARES_TARGET_EMBEDDINGS):
        if target is None:
            raise UnsupportedModelError(f"drafter '{path}' takes its embeddings and lm_head from the target; "
                                        f"load it with the target model")
        draft_ids = torch.arange(state["d2t"].numel()) + state["d2t"] if "d2t" in state else None
        state.update({"embed_tokens.weight": target.embed_tokens.weight.detach(),
                      "lm_head.weight": _head_rows(target.lm_head.weight.detach(), draft_ids)})
    with torch.device("meta"):
        model = DSparkDrafter(config)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise UnsupportedModelError(f"{path}: checkpoint lacks tensor '{key}' required by its config")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UnsupportedModelError(f"{path}: tensor '{key}' has shape {tuple(state[key].shape)}, "
                                        f"config implies {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UnsupportedModelError(f"{path}: checkpoint has tensor '{extra[0]}' that its config does not use")
    model.load_state_dict({k: _cast(v, dtype) for k, v in state.items()}, assign=True)
    model.rotary.inv_freq = model.rotary.inv_freq_for(config.head_dim, config.rope_theta)
    return model.eval()


def save_drafter(model: DSparkDrafter, path: str | Path, dtype: torch.dtype | None = None,
                 share_target_embeddings: bool = False) -> None:
    """Write config.json + model.safetensors: embed_tokens and lm_head stored as DeepSpec does, or left
    out (share_target_embeddings) when they are the target's, for a small shipped checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = config_to_dict(model.config)
    state = {k: _cast(v, dtype).detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if not (share_target_embeddings and k in TARGET_TENSORS)}
    raw.pop(SHARES_TARGET_EMBEDDINGS, None)
    if share_target_embeddings:
        raw[SHARES_TARGET_EMBEDDINGS] = True
    raw["dtype"] = str(model.fc.weight.dtype if dtype is None else dtype).removeprefix("torch.")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Weights to dtype; the draft vocabulary's integer offsets and mask stay as they are."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
