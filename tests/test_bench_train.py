"""`dspark-trt bench train`: both draft vocabularies are timed on the very same batches and anchors."""
import json

from dspark_trt.cli import main


def test_bench_train_times_each_vocabulary_on_the_same_blocks(smollm2, tmp_path, capsys):
    _, tokenizer = smollm2
    rows = []
    for i in range(8):
        prompt = tokenizer.encode(f"Question {i}: what is {i} plus {i + 1}?")
        response = tokenizer.encode(f"{i} plus {i + 1} is {2 * i + 1}. " * 6)
        rows.append(json.dumps({"key": str(i), "prompt_ids": prompt, "response_ids": response}))
    responses = tmp_path / "responses.jsonl"
    responses.write_text("\n".join(rows) + "\n")
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--responses", str(responses), "--steps", "1", "--draft-vocab", "0", "512",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    full, reduced = result["drafter_step"]["full"], result["drafter_step"]["512"]
    assert full["positions_per_step"] == reduced["positions_per_step"] > 0
    assert result["features"]["tokens_per_second"] > 0
    assert "| 512 |" in capsys.readouterr().out
