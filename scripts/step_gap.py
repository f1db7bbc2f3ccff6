"""Where a lone decode step's time goes: our fused target graph against onnxruntime-genai's int4 graph of the
same GGUF, one session run per token at batch 1, variants alternating in one process (docs/benchmarks.md,
issue #16). Both graphs run in plain ONNX Runtime sessions with the same options (make_session's), their
caches bound in place (IO binding), so what differs is the graph and the feeds, not the decode loop.

Rows: our engine's whole plain decode step (Python included, what `bench ar` times); our graph alone as the
runtime runs it on this CPU (attention's padding row, plus the matmuls' where
graphs/one_row_matmuls.py says this CPU needs it); attention's padding row only (what a CPU whose one-row
kernels agree runs); no padding (not batch-invariant: timing only); and no padding without the Q4_1 minimums
(the 120 `Add`s bypassed and their block-sum groups removed: wrong numbers, timing only).

    python scripts/step_gap.py --engines ENGINES --genai-model GENAI_DIR --rounds 12 \
        --out docs/bench/fast_engines/step_gap.json

GENAI_DIR: the model directory `bench ar` builds and caches (~/.cache/dspark-trt/peers/onnxruntime-genai-...).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

STEPS = 30  # one-token steps per variant per round
PROMPT = 30  # cached positions before the first timed step


def without_minimums(graph: onnx.GraphProto) -> None:
    """Bypass every Q4_1 minimums `Add` (MatMulNBits + MatMul(blocksum, mins)) and drop its group."""
    producer = {out: node for node in graph.node for out in node.output}
    rename, dropped = {}, set()
    for node in graph.node:
        left, right = (producer.get(name) for name in node.input[:2]) if node.op_type == "Add" else (None, None)
        if left is not None and right is not None and left.op_type == "MatMulNBits" and right.op_type == "MatMul":
            reduce_sum = producer[right.input[0]]
            dropped |= {id(node), id(right), id(reduce_sum), id(producer[reduce_sum.input[0]])}
            rename[node.output[0]] = left.output[0]
    kept = [node for node in graph.node if id(node) not in dropped]
    if "logits" in rename:  # the head's Add wrote the graph output: its MatMulNBits writes it now
        head = next(node for node in kept if node.output[0] == rename.pop("logits"))
        head.output[0] = "logits"
    for node in kept:
        node.input[:] = [rename.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)


class GenaiGraph:
    """onnxruntime-genai's decoder graph in a plain session: past and present share one buffer per layer."""

    def __init__(self, model_dir: Path, capacity: int):
        from dspark_trt.graphs.ort_session import make_session

        config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.session = make_session(model_dir / config["filename"])  # our target session's options
        shape = (1, config["num_key_value_heads"], capacity, config["head_size"])
        self.binding = self.session.io_binding()
        self._buffers = []
        for layer in range(config["num_hidden_layers"]):
            for kind in ("key", "value"):
                buffer = np.zeros(shape, np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                self.binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                self.binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
                self._buffers.append(buffer)
        self.length = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        self.binding.bind_cpu_input("input_ids", np.array([ids], np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((1, self.length + len(ids)), np.int64))
        self.binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(self.binding)
        self.length += len(ids)
        return self.binding.get_outputs()[0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, help="a build-engines directory with the fused int4 target graph")
    parser.add_argument("--genai-model", required=True, help="an onnxruntime-genai model directory of the same GGUF")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    from dspark_trt.bench.common import environment
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.graphs.ort_session import make_session
    from dspark_trt.graphs.verify_tail import no_verify_feeds
    from dspark_trt.runtimes.ort_runtime import OrtRuntime
    from dspark_trt.runtimes.target_graphs import FusedTargetGraph

    engines = Path(args.engines)
    runtime = OrtRuntime(engines, num_slots=1, max_seq_len=512, use_drafter=False)
    shipped = runtime._target
    target_file = engines / runtime.manifest["graphs"]["target"]["file"]
    with tempfile.TemporaryDirectory(dir=engines) as work:  # next to the weights its external data names
        edited = onnx.load(str(target_file), load_external_data=False)
        without_minimums(edited.graph)
        no_minimums_file = Path(work) / target_file.name
        onnx.save(edited, str(no_minimums_file))
        # a hard link: ONNX Runtime refuses external data that resolves outside the model's directory
        os.link(target_file.with_suffix(".onnx.data"), Path(work) / f"{target_file.name}.data")
        variants = {
            "ours, as run on this CPU": shipped,
            "ours, attention's padding row only": FusedTargetGraph(make_session(target_file), runtime.cache,
                                                                   pad_matmuls=False, pad_head=False),
            "ours, no padding (not batch-invariant)": FusedTargetGraph(make_session(target_file), runtime.cache,
                                                                       batch_invariant=False),
            "ours, no padding, no Q4_1 minimums (wrong numbers)": FusedTargetGraph(
                make_session(no_minimums_file), runtime.cache, batch_invariant=False),
        }
        genai = GenaiGraph(Path(args.genai_model), capacity=512)
        prompt = list(range(100, 100 + PROMPT))
        runtime.target_forward(prompt, [0], [PROMPT], "last")
        genai(prompt)
        extra = no_verify_feeds(runtime.vocab_size)
        engine = Engine(runtime)
        loop = "ours, the engine's whole decode step (plain decoding, as bench ar times it)"
        ms: dict[str, list[float]] = {name: [] for name in [loop, *variants, "onnxruntime-genai's graph"]}
        for _ in range(args.rounds):
            request = engine.generate([prompt], SamplingParams(max_tokens=STEPS + 1))[0]
            ms[loop].append((time.perf_counter() - request.stats.first_token_time) / STEPS * 1e3)
            for name, graph in variants.items():
                runtime.cache.lengths[0] = PROMPT
                started = time.perf_counter()
                for _ in range(STEPS):
                    graph(np.array([200]), np.array([0]), [1], "last", extra if "accepted" in graph.outputs else {})
                    runtime.cache.lengths[0] += 1
                ms[name].append((time.perf_counter() - started) / STEPS * 1e3)
            genai.length = PROMPT
            started = time.perf_counter()
            for _ in range(STEPS):
                genai([200])
            ms["onnxruntime-genai's graph"].append((time.perf_counter() - started) / STEPS * 1e3)
    genai_ms = statistics.median(ms["onnxruntime-genai's graph"])
    rows = {name: {"ms_per_step": [round(x, 2) for x in values], "median_ms": round(statistics.median(values), 2),
                   "vs_genai_graph": round(statistics.median(values) / genai_ms, 2)} for name, values in ms.items()}
    width = max(map(len, rows))
    for name, row in rows.items():
        print(f"{name:{width}s} {row['median_ms']:6.2f} ms  {row['vs_genai_graph']:.2f}x genai's   {row['ms_per_step']}")
    print(f"padding this CPU needs: matmuls {shipped.pad_matmuls}, LM head {shipped.pad_head}")
    if args.out:
        result = {"benchmark": "step_gap", "rounds": args.rounds, "steps_per_round": STEPS, "cached_positions": PROMPT,
                  "padding_needed": {"matmuls": shipped.pad_matmuls, "lm_head": shipped.pad_head},
                  "engines": str(engines), "genai_model": args.genai_model, "results": rows, **environment()}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
