"""How much of a draft pass its weight matmuls alone cost: the floor under the drafter's pass on this CPU.

One profiled pass of the engine directory's draft graph at each R gives every weight matmul's shape as it ran
(M rows, K, N, and its format: MatMul = float32, MatMulIntegerToFloat = int8 with its per-row activation
quantization, MatMulNBits = int4). Each is then timed standalone (random weights of the same format, the same
session options as the runtime's drafter, the cost of an empty run subtracted), in all three formats, and summed.
The whole pass and the one-token target step are timed as `bench draft` times them (minimum over rounds).
Prints one JSON object.

    python scripts/draft_matmul_floor.py --engines ENGINES --requests 1 4 16 --out floor.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

FORMATS = {"MatMul": "fp32", "FusedMatMul": "fp32", "MatMulIntegerToFloat": "int8", "MatMulNBits": "int4"}


def _options(profile_dir: str | None = None):
    """The drafter session's options (graphs/ort_session.make_session with spin=False), optionally profiled."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "draft")
    return options


def weight_matmuls(engines: str, requests: int, context: int) -> list[dict]:
    """The draft graph's weight matmuls at R = requests, from one profiled pass: node, format, M, K, N."""
    from dspark_trt.bench.draft import _draft, _prepared
    from dspark_trt_plugins.ort_op import inference_session, session_options_with_dspark_ops

    runtime, slots = _prepared(engines, requests, context)
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(engines) / runtime.manifest["graphs"]["draft"]["file"]
        runtime.drafter.sessions["draft"] = inference_session(graph, session_options_with_dspark_ops(_options(tmp)))
        _draft(runtime, slots[:requests], [None] * requests)
        events = json.loads(Path(runtime.drafter.sessions["draft"].end_profiling()).read_text())
    found = []
    for event in events:
        args = event.get("args", {})
        op = args.get("op_name")
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or op not in FORMATS:
            continue
        a_shape = list(args["input_type_shape"][0].values())[0]
        out_shape = list(args["output_type_shape"][0].values())[0]
        second = list(args["input_type_shape"][1].values())[0] if len(args["input_type_shape"]) > 1 else []
        if op in ("MatMul", "FusedMatMul") and len(second) > 2:
            continue  # activation x activation (attention scores): no weights
        found.append({"node": event["name"].removesuffix("_kernel_time"), "format": FORMATS[op],
                      "M": int(np.prod(a_shape[:-1])), "K": a_shape[-1], "N": out_shape[-1]})
    return found


def _matmul_session(m: int, k: int, n: int, weights: str):
    import onnxruntime as ort

    from dspark_trt.export.weight_quant import quantize_matmuls

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) * 0.05
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if weights != "fp32":
        quantize_matmuls(model, weights, min_elements=1, min_depth=1)
    return ort.InferenceSession(model.SerializeToString(), _options())


def _best_us(session, feeds: dict, repeats: int) -> float:
    for _ in range(10):
        session.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - started)
    return best * 1e6


def _empty_run_us(repeats: int) -> float:
    import onnxruntime as ort

    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "empty",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _best_us(ort.InferenceSession(model.SerializeToString(), _options()), {"a": np.zeros(1, np.float32)},
                    repeats)


def _pass_ms(engines: str, requests: int, context: int, rounds: int) -> tuple[float, float]:
    """(the draft pass at R = requests, the one-token target step), ms, minimum over interleaved rounds."""
    from dspark_trt.bench.draft import _draft, _prepared, _target_step

    runtime, slots = _prepared(engines, requests, context)
    calls = (lambda: _draft(runtime, slots[:requests], [None] * requests), lambda: _target_step(runtime, slots[:1]))
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            started = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - started)
    return best[0] * 1000, best[1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, help="a build-engines directory with a drafter")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out")
    args = parser.parse_args()
    from dspark_trt.bench.common import environment

    empty = _empty_run_us(args.repeats)
    result = {"engines": args.engines, "empty_run_us": round(empty, 1), "by_requests": {},
              "method": "standalone minimum over repeats minus an empty run's; the pass as bench draft times it"}
    for r in args.requests:
        matmuls = weight_matmuls(args.engines, r, args.context)
        shapes = Counter((m["M"], m["K"], m["N"], m["format"]) for m in matmuls)
        sums = {fmt: 0.0 for fmt in ("fp32", "int8", "int4")}
        rows = []
        for (m, k, n, fmt), count in sorted(shapes.items()):
            feeds = {"a": np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)}
            each = {w: max(0.0, _best_us(_matmul_session(m, k, n, w), feeds, args.repeats) - empty) for w in sums}
            for w in sums:
                sums[w] += count * each[w]
            rows.append({"M": m, "K": k, "N": n, "format in graph": fmt, "count": count,
                         **{f"{w} us": round(v, 1) for w, v in each.items()}})
        as_built = sum(row["count"] * row[f"{row['format in graph']} us"] for row in rows)
        best_each = sum(row["count"] * min(row[f"{w} us"] for w in sums) for row in rows)
        pass_ms, target_ms = _pass_ms(args.engines, r, args.context, rounds=30)
        result["by_requests"][str(r)] = {
            "pass ms": round(pass_ms, 2), "target step ms": round(target_ms, 2),
            "weight matmuls as built ms": round(as_built / 1000, 2),
            "best format per matmul ms": round(best_each / 1000, 2),
            **{f"all {w} ms": round(v / 1000, 2) for w, v in sums.items()}, "matmuls": rows}
        print(f"R={r}: pass {pass_ms:.2f} ms (target step {target_ms:.2f} ms), its weight matmuls "
              f"{as_built / 1000:.2f} ms as built, "
              f"{best_each / 1000:.2f} ms with the best format for each", flush=True)
    result["environment"] = environment()
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
