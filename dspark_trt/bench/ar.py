"""Our autoregressive decode (engine, schedule off, torch runtime) vs transformers `generate`,
same prompt, same process, interleaved repeats."""
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


def bench_ar(target: str, prompt: str, max_tokens: int, repeats: int, progress=lambda msg: None) -> dict:
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_target(target)
    source = resolve_model(target)
    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                              dtype=torch.float32).eval()
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    # fixed length on both sides: no stop token, exactly max_tokens new tokens
    params = SamplingParams(max_tokens=max_tokens)
    engine = Engine(TorchRuntime(model, num_slots=1, max_seq_len=len(prompt_ids) + max_tokens + 8))

    def ours():
        return engine.generate([prompt_ids], params)[0].output_ids

    def theirs():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return out[0, len(prompt_ids):].tolist()

    ours()  # warm-up both
    theirs()
    ours_s, theirs_s, same = [], [], True
    for i in range(repeats):
        ids_ours, s_ours = timed(ours)
        ids_theirs, s_theirs = timed(theirs)
        ours_s.append(s_ours)
        theirs_s.append(s_theirs)
        # transformers' min_new_tokens masks EOS while ours runs through it: compare up to our first EOS
        cut = next((k for k, t in enumerate(ids_ours) if t in model.config.eos_token_ids), len(ids_ours))
        same &= ids_ours[:cut] == ids_theirs[:cut]
        progress(f"repeat {i + 1}/{repeats}: ours {max_tokens / s_ours:.1f} tok/s, "
                 f"transformers {max_tokens / s_theirs:.1f} tok/s")
    ours_tps = max_tokens / statistics.median(ours_s)
    theirs_tps = max_tokens / statistics.median(theirs_s)
    return {"benchmark": "ar", "target": target, "prompt_tokens": len(prompt_ids), "new_tokens": max_tokens,
            "repeats": repeats, "ours_tokens_per_second": ours_tps, "transformers_tokens_per_second": theirs_tps,
            "ratio": ours_tps / theirs_tps, "token_identical": same, "environment": environment()}
