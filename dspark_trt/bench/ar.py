"""Our autoregressive decode (engine, schedule off) on torch and, optionally, on ONNX Runtime engines,
vs transformers `generate`: same prompt, same process, interleaved repeats."""
from __future__ import annotations

import statistics

import torch

from dspark_trt.bench.common import environment, timed
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.models.sources import resolve_model
from dspark_trt.models.weights import load_target
from dspark_trt.runtimes.torch_runtime import TorchRuntime


def bench_ar(target: str, prompt: str, max_tokens: int, repeats: int, progress=lambda msg: None,
             engines: str | None = None) -> dict:
    """Tokens/s of each contender, timed interleaved: our engine on torch, on ONNX Runtime when
    `engines` (a build-engines directory of this target) is given, and transformers generate."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_target(target)
    source = resolve_model(target)
    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                              dtype=torch.float32).eval()
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    # fixed length on both sides: no stop token, exactly max_tokens new tokens
    params = SamplingParams(max_tokens=max_tokens)
    seq_len = len(prompt_ids) + max_tokens + 8

    def engine_run(runtime):
        engine = Engine(runtime)
        return lambda: engine.generate([prompt_ids], params)[0].output_ids

    def transformers_run():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return out[0, len(prompt_ids):].tolist()

    contenders = {"ours": engine_run(TorchRuntime(model, num_slots=1, max_seq_len=seq_len))}
    if engines is not None:
        from dspark_trt.runtimes.ort_runtime import OrtRuntime

        contenders["onnxruntime"] = engine_run(OrtRuntime(engines, num_slots=1, max_seq_len=seq_len,
                                                          use_drafter=False))
    contenders["transformers"] = transformers_run
    for run in contenders.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    same = True
    for i in range(repeats):
        outputs = {}
        for name, run in contenders.items():
            outputs[name], elapsed = timed(run)
            seconds[name].append(elapsed)
        # transformers' min_new_tokens masks EOS while ours runs through it: compare up to our first EOS
        ours = outputs["ours"]
        cut = next((k for k, t in enumerate(ours) if t in model.config.eos_token_ids), len(ours))
        same &= all(ids[:cut] == ours[:cut] for ids in outputs.values())
        progress(f"repeat {i + 1}/{repeats}: " + ", ".join(
            f"{name} {max_tokens / s[-1]:.1f} tok/s" for name, s in seconds.items()))
    tps = {name: max_tokens / statistics.median(s) for name, s in seconds.items()}
    result = {"benchmark": "ar", "target": target, "prompt_tokens": len(prompt_ids), "new_tokens": max_tokens,
              "repeats": repeats, "ours_tokens_per_second": tps["ours"],
              "transformers_tokens_per_second": tps["transformers"], "ratio": tps["ours"] / tps["transformers"],
              "token_identical": same, "environment": environment()}
    if engines is not None:
        result.update(engines=str(engines), onnxruntime_tokens_per_second=tps["onnxruntime"],
                      onnxruntime_vs_torch=tps["onnxruntime"] / tps["ours"])
    return result
