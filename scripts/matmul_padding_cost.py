"""What the matmul padding row costs a lone request: greedy decoding at batch 1 on a build-engines directory,
with the fused runtime's `pad_matmuls` on and off, alternating in one process (docs/benchmarks.md, batch
invariance). Prints decode tok/s per round and the ratio of the medians, and whether this CPU needs the padding
(graphs/one_row_matmuls.py). Without it the outputs may differ where the probe says the kernels differ.

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
    from dspark_trt.graphs.one_row_matmuls import matmul_configs, one_row_matmuls_match
    from dspark_trt.runtimes.ort_runtime import OrtRuntime

    engines = Path(args.engines)
    runtime = OrtRuntime(engines, num_slots=1, max_seq_len=512, use_drafter=False)
    configs = matmul_configs(engines / read_manifest(engines)["graphs"]["target"]["file"])
    print(f"this CPU's one-row MatMulNBits kernels agree with the longer ones: {one_row_matmuls_match(configs)} "
          f"(so the runtime pads: {runtime._target.pad_matmuls})")
    engine = Engine(runtime)
    prompt = list(range(100, 160))
    params = SamplingParams(max_tokens=args.max_tokens)
    engine.generate([prompt], SamplingParams(max_tokens=8))  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for pad in (True, False):
            runtime._target.pad_matmuls = pad
            start = time.perf_counter()
            request = engine.generate([prompt], params)[0]
            rates[pad].append(len(request.output_ids) / (time.perf_counter() - start))
    for pad, values in rates.items():
        print(f"pad_matmuls={pad}: median {statistics.median(values):.1f} tok/s "
              f"({', '.join(f'{v:.1f}' for v in values)})")
    print(f"padded / unpadded: {statistics.median(rates[True]) / statistics.median(rates[False]):.2f}")


if __name__ == "__main__":
    main()
