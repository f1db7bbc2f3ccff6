"""DeepSpec checkpoint format: round trip, and clear errors for checkpoints that do not fit."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_trt import load_drafter
from dspark_trt.errors import ModelNotFoundError, UnsupportedModelError
from dspark_trt.models.drafter_checkpoint import drafter_config_for_target, random_drafter, save_drafter

from conftest import SHARED
from test_drafter import TINY_TARGET

FIXTURE = SHARED / "fixtures" / "deepspec" / "qwen3_vanilla_b7"


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn", None])
def test_save_load_round_trip(tmp_path, head):
    cfg = drafter_config_for_target(TINY_TARGET, block_size=4, num_draft_layers=2, mask_token_id=60,
                                    markov_rank=8 if head else 0, markov_head_type=head or "vanilla",
                                    enable_confidence_head=head is not None)
    drafter = random_drafter(cfg, seed=0)
    save_drafter(drafter, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3DSparkModel"] and raw["tie_word_embeddings"] is False
    assert ("markov_head_type" in raw) == (head is not None)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"embed_tokens.weight", "lm_head.weight", "fc.weight", "hidden_norm.weight"} <= keys
    assert not any(k.startswith("model.") for k in keys)
    loaded = load_drafter(tmp_path)
    for k, v in drafter.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.config.target_layer_ids == cfg.target_layer_ids


def test_fixture_saved_again_is_identical(tmp_path):
    drafter = load_drafter(FIXTURE)
    save_drafter(drafter, tmp_path)
    original, again = load_file(FIXTURE / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def _copy_fixture(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    for item in FIXTURE.iterdir():  # copy contents only: shared/ may be read-only
        shutil.copyfile(item, target / item.name)
    return target


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = _copy_fixture(tmp_path)
    state = load_file(path / "model.safetensors")
    state["layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(state, path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match=r"'layers.1.self_attn.k_proj.weight' has shape \(16, 64\), "
                                                    r"config implies \(32, 64\)"):
        load_drafter(path)


def test_missing_and_extra_tensors_are_named(tmp_path):
    path = _copy_fixture(tmp_path)
    state = load_file(path / "model.safetensors")
    del state["markov_head.markov_w2.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="lacks tensor 'markov_head.markov_w2.weight'"):
        load_drafter(path)
    raw = json.loads((path / "config.json").read_text())
    raw["markov_rank"] = 0  # now the config no longer uses the remaining markov tensor
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="'confidence_head.proj.weight' has shape|does not use"):
        load_drafter(path)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("mask_token_id"), "missing required field"),
    (lambda r: r.update(markov_head_type="lstm"), "markov_head_type"),
    (lambda r: r.update(target_layer_ids=[4, 2]), "strictly increasing"),
    (lambda r: r.update(target_layer_ids=[0, 6]), r"in \[-1, 5\]"),
    (lambda r: r.update(architectures=["Gemma4DSparkModel"]), "Gemma4DSparkModel' is not supported"),
])
def test_bad_config_is_a_clear_error(tmp_path, edit, message):
    path = _copy_fixture(tmp_path)
    raw = json.loads((path / "config.json").read_text())
    edit(raw)
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match=message):
        load_drafter(path)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_drafter(tmp_path)


def test_a_checkpoint_sharing_the_targets_embeddings_is_small_and_loads_with_the_target(tmp_path):
    from dspark_trt.models.target import TargetModel

    torch.manual_seed(0)
    target = TargetModel(TINY_TARGET)
    cfg = drafter_config_for_target(TINY_TARGET, block_size=4, num_draft_layers=1, mask_token_id=60, markov_rank=8)
    drafter = random_drafter(cfg, seed=1, target=target)
    save_drafter(drafter, tmp_path, dtype=torch.bfloat16, share_target_embeddings=True)
    assert not {"embed_tokens.weight", "lm_head.weight"} & set(load_file(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="load it with the target"):
        load_drafter(tmp_path)
    loaded = load_drafter(tmp_path, target=target)
    for k, v in drafter.state_dict().items():  # bfloat16 storage: equal to bfloat16 rounding
        if k in ("embed_tokens.weight", "lm_head.weight"):
            continue
        torch.testing.assert_close(loaded.state_dict()[k], v.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert torch.equal(loaded.lm_head.weight, target.lm_head.weight)
    save_drafter(loaded, tmp_path / "full")  # saved again without sharing: a plain DeepSpec checkpoint
    assert "dspark_trt_shares_target_embeddings" not in json.loads((tmp_path / "full" / "config.json").read_text())
    assert torch.equal(load_drafter(tmp_path / "full").embed_tokens.weight, target.embed_tokens.weight)


def test_default_names_the_packaged_drafter():
    from dspark_trt.models.drafter_checkpoint import resolve_drafter

    assert resolve_drafter("default").parts[-2:] == ("drafters", "smollm2")
    assert resolve_drafter("some/dir") == __import__("pathlib").Path("some/dir")


def test_the_shipped_drafter_fits_its_target_and_carries_its_calibration(smollm2):
    """What `--draft default` finds after pip install: a bfloat16 DeepSpec checkpoint under 30 MiB that
    loads against SmolLM2 (shared embeddings), drafts in its (draft) vocabulary, and an STS calibration with one
    positive temperature per block position."""
    from dspark_trt.models.drafter_checkpoint import resolve_drafter, stored_calibration
    from dspark_trt.spec.calibration import load_calibration

    target, _ = smollm2
    directory = resolve_drafter("default")
    assert (directory / "model.safetensors").stat().st_size <= 30 * 2**20
    drafter = load_drafter(directory, target=target)
    assert drafter.config.vocab_size == target.config.vocab_size
    rows = target.lm_head.weight if drafter.draft_ids is None else target.lm_head.weight[drafter.draft_ids]
    assert torch.equal(drafter.lm_head.weight, rows)  # the target's own rows of the draft vocabulary
    temps = load_calibration(stored_calibration("default")).temperatures
    assert len(temps) == drafter.config.block_size and all(t > 0 for t in temps)
