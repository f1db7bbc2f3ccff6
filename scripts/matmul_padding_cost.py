"""What the matmul padding rows cost a lone request: greedy decoding at batch 1 on a build-engines directory,
with the fused runtime's padding as this CPU needs it (`pad_matmuls` for the layers, `pad_head` for the LM
head), with both padded (as before the head was asked apart) and with none, alternating in one process
(docs/benchmarks.md, batch invariance). Prints decode tok/s per round and each variant's median against
none, and what this CPU needs (graphs/one_row_matmuls.py). Without the padding the outputs may differ where
the probe says the kernels differ.

    python scripts/matmul_padding_cost.py --engines ENGINES --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, help="a build-engines directory with the fused target graph")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.graphs.manifest import read_manifest
    from dspark_trt.graphs.one_row_matmuls import one_row_padding
    from dspark_trt.runtimes.ort_runtime import OrtRuntime

    engines = Path(args.engines)
    runtime = OrtRuntime(engines, num_slots=1, max_seq_len=512, use_drafter=False)
    needed = one_row_padding(engines / read_manifest(engines)["graphs"]["target"]["file"], runtime.vocab_size)
    print(f"this CPU needs a second row for the layers' matmuls: {needed[0]}, for the LM head: {needed[1]}")
    engine = Engine(runtime)
    prompt = list(range(100, 160))
    params = SamplingParams(max_tokens=args.max_tokens)
    engine.generate([prompt], SamplingParams(max_tokens=8))  # warm-up
    variants = {"as needed": needed, "layers and head": (True, True), "none": (False, False)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (layers, head) in variants.items():
            runtime._target.pad_matmuls, runtime._target.pad_head = layers, head
            start = time.perf_counter()
            request = engine.generate([prompt], params)[0]
            rates[name].append(len(request.output_ids) / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"padding {name}: median {medians[name]:.1f} tok/s ({', '.join(f'{v:.1f}' for v in values)}), "
              f"{medians[name] / medians['none']:.2f}x unpadded")

if __name__ == "__main__":
    main()
