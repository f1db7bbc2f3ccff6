"""What top-k / top-p cost a sampled speculative decode: the engine at `--concurrency` requests, fixed gamma,
with spec/sampling.py's partial sort (torch.topk of the best candidates) and with the whole-row sort it
replaced (tests/test_sampling.py's definition), alternating in one process (docs/benchmarks.md). Both keep
the same tokens; each round's outputs are compared.

    python scripts/sampling_mask_cost.py --engines ENGINES --prompts-file ../shared/data/eval/mt-bench.jsonl
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, help="a build-engines directory with a drafter")
    parser.add_argument("--prompts-file", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.95)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_sampling import full_sort_mask

    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.prompts import chat_prompt_ids, read_prompts_file
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.graphs.manifest import load_engine_tokenizer
    from dspark_trt.runtimes.ort_runtime import OrtRuntime
    from dspark_trt.spec import sampling
    from dspark_trt.spec.scheduler import make_scheduler

    partial = sampling._mask_top_k_top_p

    def whole_row(scaled, top_k, top_p):
        return scaled.masked_fill(full_sort_mask(scaled, top_k, top_p), float("-inf"))

    tokenizer = load_engine_tokenizer(args.engines)
    prompts = [chat_prompt_ids(tokenizer, p) for p in read_prompts_file(args.prompts_file, args.concurrency)]
    runtime = OrtRuntime(args.engines, num_slots=args.concurrency, max_seq_len=1024)
    engine = Engine(runtime, make_scheduler("fixed", runtime.block_size, gamma=args.gamma))
    engine.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    rates: dict[str, list[float]] = {"partial sort": [], "whole-row sort": []}
    for round_ in range(args.rounds):
        outputs = {}
        for name, mask in (("partial sort", partial), ("whole-row sort", whole_row)):
            sampling._mask_top_k_top_p = mask
            params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, seed=1000 * round_ + i) for i in range(len(prompts))]
            start = time.perf_counter()
            requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
            engine.run()
            seconds = time.perf_counter() - start
            outputs[name] = [r.output_ids for r in requests]
            rates[name].append(sum(len(o) for o in outputs[name]) / seconds)
        same = outputs["partial sort"] == outputs["whole-row sort"]
        print(f"round {round_}: " + ", ".join(f"{n} {v[-1]:.1f} tok/s" for n, v in rates.items())
              + f"; same tokens: {same}", flush=True)
    sampling._mask_top_k_top_p = partial
    medians = {n: statistics.median(v) for n, v in rates.items()}
    print(", ".join(f"{n}: median {m:.1f} tok/s" for n, m in medians.items())
          + f"; partial / whole-row: {medians['partial sort'] / medians['whole-row sort']:.2f}")


if __name__ == "__main__":
    main()
