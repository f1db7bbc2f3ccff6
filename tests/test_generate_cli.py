"""`dspark-trt generate --no-spec` end to end: JSON record, parity with transformers, bad input."""
import contextlib
import io
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import smollm2_loaded_once

from dspark_trt.engine.prompts import chat_prompt_ids

PROMPT = "Write a haiku about the sea."


def _generate(*args) -> SimpleNamespace:
    """`dspark-trt generate ARGS` in this process (a subprocess a call spent seconds importing): its exit code,
    stdout and stderr."""
    from dspark_trt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["generate", *args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow
def test_greedy_generate_equals_transformers(smollm2, smollm2_hf):
    with smollm2_loaded_once(smollm2):
        out = _generate("--target", "smollm2", "--no-spec", "--prompt", PROMPT, "--max-tokens", "64", "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    _, tokenizer = smollm2
    prompt_ids = chat_prompt_ids(tokenizer, PROMPT)
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.tensor([prompt_ids]), max_new_tokens=64, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    expected = ref[0, len(prompt_ids):].tolist()
    assert record["token_ids"] == expected
    assert record["num_tokens"] == len(expected)
    assert record["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert record["mean_accepted_length"] == 1.0
    assert record["tokens_per_second"] > 0 and record["seconds"] > 0


def test_prompt_longer_than_context_is_refused(smollm2):
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.errors import DSparkError
    from dspark_trt.runtimes.torch_runtime import TorchRuntime

    model, _ = smollm2
    engine = Engine(TorchRuntime(model, num_slots=1, max_seq_len=32))
    with pytest.raises(DSparkError, match="context limit is 32"):
        engine.add_request(list(range(40)), SamplingParams(max_tokens=4))
    with pytest.raises(DSparkError, match="max_tokens"):
        engine.add_request([1, 2], SamplingParams(max_tokens=0))


def test_bad_cli_input_is_a_clear_error():
    out = _generate("--target", "no-such-model", "--no-spec", "--prompt", "hi")
    assert out.returncode == 2 and "model 'no-such-model' not found" in out.stderr
    out = _generate("--no-spec")
    assert out.returncode == 2 and "no prompt given" in out.stderr
    out = _generate("--prompt", "hi")
    assert out.returncode == 2 and "--draft" in out.stderr
