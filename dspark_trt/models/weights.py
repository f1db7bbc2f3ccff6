"""Load a target model's weights from a Hugging Face directory or a GGUF file into TargetModel."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dspark_trt.errors import UnsupportedModelError
from dspark_trt.models.sources import ModelSource, load_config, load_tokenizer, read_safetensors_dir, resolve_model
from dspark_trt.models.target import SUPPORTED_ARCHITECTURES, TargetConfig, TargetModel


def load_target(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(TargetModel in eval mode, tokenizer) for an alias, a .gguf file or a HF directory."""
    source = resolve_model(name_or_path)
    if source.kind == "gguf":
        from dspark_trt.models.gguf_reader import open_gguf

        reader = open_gguf(source.path)
        config = _gguf_config(reader, source.path)
        state = _read_gguf(reader, source.path, config)
    else:
        config = TargetConfig.from_hf(load_config(source))
        _add_generation_config_eos(source, config)
        state = _read_hf(source.path)
    tokenizer = load_tokenizer(source)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in config.eos_token_ids:
        config.eos_token_ids.append(tokenizer.eos_token_id)
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = TargetModel(config)
    _load_state(model, state)
    return model.to(dtype).eval(), tokenizer


def _add_generation_config_eos(source: ModelSource, config: TargetConfig) -> None:
    path = source.directory / "generation_config.json"
    if source.kind != "hf" or not path.is_file():
        return
    eos = json.loads(path.read_text()).get("eos_token_id")
    for token in [eos] if isinstance(eos, int) else (eos or []):
        if token not in config.eos_token_ids:
            config.eos_token_ids.append(token)


def _read_hf(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of a Hugging Face directory, without transformers' `model.` prefix."""
    return {k.removeprefix("model."): v for k, v in read_safetensors_dir(directory).items()}


# GGUF tensor name (per block) -> our parameter name
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def _gguf_config(reader, path: Path) -> TargetConfig:
    """TargetConfig straight from GGUF metadata (transformers' GGUF config parsing takes seconds)."""
    fields = reader.fields

    def get(key: str, default=None):
        return fields[key].contents() if key in fields else default

    arch = get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path.name}: unsupported architecture '{arch}': supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden, heads = int(get(f"{arch}.embedding_length")), int(get(f"{arch}.attention.head_count"))
    vocab = get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"].data)
    eos = get("tokenizer.ggml.eos_token_id")
    return TargetConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get(f"{arch}.feed_forward_length")),
        num_layers=int(get(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(get(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(get(f"{arch}.context_length")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        eos_token_ids=[] if eos is None else [int(eos)],
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
    )


def gguf_param_name(gguf_name: str, path: Path) -> str | None:
    """Our parameter name for a GGUF tensor name (None for tensors recomputed from the config)."""
    stem, _, kind = gguf_name.rpartition(".")  # e.g. "blk.3.attn_q", "weight"
    parts = stem.split(".")
    if parts[0] == "blk":
        if parts[2] not in _GGUF_BLOCK_NAMES:
            raise UnsupportedModelError(f"{path.name}: unexpected tensor {gguf_name}")
        return f"layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}.{kind}"
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{kind}"
    return None  # e.g. rope_freqs: recomputed from the config


def _permuted_heads(name: str, config: TargetConfig) -> int | None:
    """Heads of a Llama Q/K projection, whose rows llama.cpp's converter permuted (None otherwise)."""
    if config.arch != "llama":
        return None
    if name.endswith("self_attn.q_proj.weight"):
        return config.num_heads
    if name.endswith("self_attn.k_proj.weight"):
        return config.num_kv_heads
    return None


def _read_gguf(reader, path: Path, config: TargetConfig) -> dict[str, torch.Tensor]:
    """Dequantise every tensor to float32 and undo llama.cpp's Q/K row permutation for Llama."""
    import gguf

    state = {}
    for tensor in reader.tensors:
        name = gguf_param_name(tensor.name, path)
        if name is None:
            continue
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        heads = _permuted_heads(name, config)
        if heads is not None:
            array = _unpermute_qk(array, heads)
        state[name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    return state


def load_block_weights(name_or_path: str) -> tuple[TargetConfig, dict]:
    """(config, {parameter name: BlockWeight}) of a GGUF target: its quantized weights as stored, with
    Llama's Q/K rows put back in our order. An HF directory has none (empty dict)."""
    from dspark_trt.models.gguf_blocks import read_block_weights

    source = resolve_model(name_or_path)
    if source.kind != "gguf":
        return TargetConfig.from_hf(load_config(source)), {}
    from dspark_trt.models.gguf_reader import open_gguf

    reader = open_gguf(source.path)
    config = _gguf_config(reader, source.path)
    blocks = read_block_weights(reader, lambda name: gguf_param_name(name, source.path))
    for name, weight in blocks.items():
        heads = _permuted_heads(name, config)
        if heads is not None:
            order = _unpermute_qk(np.arange(weight.shape[0])[:, None], heads)[:, 0]
            blocks[name] = weight.rows(order)
    return config, blocks


def _unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp convert's permute(): interleaved rotary pairs back to rotate-half order."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _load_state(model: TargetModel, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model; any missing, extra or mis-shaped tensor is an error naming it."""
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise UnsupportedModelError(
            f"weights do not match the {model.config.arch} architecture: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UnsupportedModelError(
                f"weight {name}: shape {tuple(state[name].shape)} != expected {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.inv_freq = model.rotary.inv_freq_for(model.config.head_dim, model.config.rope_theta)
