"""Shared fixtures: the real default model is loaded once per test session (it takes seconds)."""
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


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
