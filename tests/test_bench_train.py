"""`dspark-trt bench train`: each draft vocabulary and precision is timed on the very same batches and anchors."""
import json

import pytest
from conftest import smollm2_loaded_once

from dspark_trt.cli import main


def test_bench_train_times_each_vocabulary_on_the_same_blocks(smollm2, tmp_path, capsys):
    _, tokenizer = smollm2
    rows = []
    for i in range(4):
        prompt = tokenizer.encode(f"Question {i}: what is {i} plus {i + 1}?")
        response = tokenizer.encode(f"{i} plus {i + 1} is {2 * i + 1}. " * 2)
        rows.append(json.dumps({"key": str(i), "prompt_ids": prompt, "response_ids": response}))
    responses = tmp_path / "responses.jsonl"
    responses.write_text("\n".join(rows) + "\n")
    out = tmp_path / "train.json"
    with smollm2_loaded_once(smollm2):
        assert main(["bench", "train", "--responses", str(responses), "--steps", "1", "--draft-vocab", "256", "512",
                     "--precision", "fp32", "bf16", "--batch-size", "2", "--num-anchors", "8",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["drafter_step"]
    assert sorted(rows) == ["256 bf16", "256 fp32", "512 bf16", "512 fp32"]
    assert len({row["positions_per_step"] for row in rows.values()}) == 1 and rows["256 fp32"]["positions_per_step"] > 0
    for size in ("256", "512"):  # same blocks, same initial drafter: the same first loss to bfloat16's precision
        assert rows[f"{size} bf16"]["loss_first_step"] == pytest.approx(rows[f"{size} fp32"]["loss_first_step"], rel=2e-2)
    assert rows["256 fp32"]["loss_first_step"] != rows["512 fp32"]["loss_first_step"]  # another vocabulary
    assert result["features"]["tokens_per_second"] > 0
    assert result["batch_size"] == 2 and result["num_anchors"] == 8
    assert "| 512 bf16 |" in capsys.readouterr().out
