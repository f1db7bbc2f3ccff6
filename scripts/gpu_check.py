"""The checks that need a GPU, as one script for a lent CUDA machine (none of ours has one).

1. The torch runtime on CUDA with the real target and the shipped drafter: greedy DSpark output against greedy
   AR on the same GPU (token identity, or the first position where they part), AR on the GPU against AR on the
   CPU, and decode speed at batch 1.
2. The Triton DSparkVerify kernel compiled for the GPU, timed against the torch reference on the same GPU at the
   target's vocabulary (its correctness is tests/test_verify_triton.py with DSPARK_TRITON_DEVICE=cuda).

Usage: python scripts/gpu_check.py --out gpu_check.json [--prompts 4 --max-new-tokens 96]
Every section records its error instead of stopping the others.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from dspark_trt.devices import device_scope
from dspark_trt.engine.factory import EngineOptions, build_engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "A train travels 180 km in 2.5 hours. What is its average speed in km/h? Explain step by step.",
    "Give three tips for writing clear technical documentation.",
    "Solve for x: 3x + 7 = 22. Show your work.",
    "Explain what a hash map is and when to use one.",
    "List the first five prime numbers and say why 1 is not prime.",
]


def _generate(device: str, draft: str | None, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Each prompt alone (batch 1), greedy: output ids, tok/s and tokens per round."""
    engine, _ = build_engine(EngineOptions(draft=draft, schedule="fixed" if draft else "off", num_slots=1,
                                           device=device))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    engine.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up (CUDA context, kernels)
    outputs, tokens, rounds, seconds = [], 0, 0, 0.0
    for ids in prompts:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        (request,) = engine.generate([ids], params)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        outputs.append(request.output_ids)
        tokens += len(request.output_ids)
        rounds += len(request.stats.accepted_lengths)  # none without a drafter: one token a step
    return {"outputs": outputs, "tokens": tokens, "seconds": round(seconds, 3),
            "tok_per_s": round(tokens / seconds, 1), "tokens_per_round": round(tokens / rounds, 3) if rounds else 1.0}


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def runtime_check(n_prompts: int, max_new_tokens: int) -> dict:
    from dspark_trt.models.weights import load_target

    _, tokenizer = load_target("smollm2")
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS[:n_prompts]]
    ar_gpu = _generate("cuda", None, prompts, max_new_tokens)
    spec_gpu = _generate("cuda", "default", prompts, max_new_tokens)
    ar_cpu = _generate("cpu", None, prompts, max_new_tokens)
    return {
        "spec_vs_ar_gpu_first_difference": [_first_difference(a, b) for a, b in
                                            zip(ar_gpu["outputs"], spec_gpu["outputs"])],
        "ar_gpu_vs_ar_cpu_first_difference": [_first_difference(a, b) for a, b in
                                              zip(ar_gpu["outputs"], ar_cpu["outputs"])],
        **{f"{name}_{key}": run[key] for name, run in (("ar_gpu", ar_gpu), ("spec_gpu", spec_gpu), ("ar_cpu", ar_cpu))
           for key in ("tokens", "seconds", "tok_per_s", "tokens_per_round")},
    }


def kernel_timing(vocab: int = 49152, requests: int = 16, rows_per_request: int = 8) -> dict:
    import triton.testing

    from dspark_trt.spec.verify import dspark_verify
    from dspark_trt_plugins.triton_kernel import dspark_verify_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    n_rows = requests * rows_per_request
    logits = torch.randn(n_rows, vocab, device="cuda", generator=g) * 3
    q = torch.softmax(torch.randn(n_rows - requests, vocab, device="cuda", generator=g), -1)
    inputs = dict(target_logits=logits, draft_tokens=torch.multinomial(q, 1, generator=g).squeeze(1), draft_probs=q,
                  row_offsets=torch.arange(0, n_rows + 1, rows_per_request, device="cuda"),
                  temperature=torch.full((requests,), 0.7, device="cuda"),
                  top_k=torch.zeros(requests, dtype=torch.long, device="cuda"),
                  top_p=torch.ones(requests, device="cuda"),
                  uniforms=torch.rand(n_rows, device="cuda", generator=g, dtype=torch.float64))
    def reference():
        with device_scope("cuda"):  # the reference makes its index tensors where the inputs are
            return dspark_verify(**inputs)

    ref, got = reference(), dspark_verify_triton(**inputs)
    return {"vocab": vocab, "requests": requests, "rows_per_request": rows_per_request,
            "kernel_ms": round(triton.testing.do_bench(lambda: dspark_verify_triton(**inputs)), 4),
            "torch_reference_ms": round(triton.testing.do_bench(reference), 4),
            "accepted_equal": bool(torch.equal(ref.accepted.cpu(), got.accepted.cpu())),
            "next_token_equal": bool(torch.equal(ref.next_token.cpu(), got.next_token.cpu()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for name, check in (("kernel", kernel_timing), ("runtime", lambda: runtime_check(args.prompts,
                                                                                      args.max_new_tokens))):
        try:
            report[name] = check()
        except Exception:  # noqa: BLE001 - a failed section is a result too
            report[name] = {"error": traceback.format_exc()}
        print(json.dumps({name: report[name]}, indent=1), flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
