"""Export the target and drafter to ONNX, check and validate the graphs on ONNX Runtime against torch,
and write an engine directory with manifest.json (--backend tensorrt also compiles TensorRT plans, on an
NVIDIA GPU host)."""
from __future__ import annotations

import argparse
import json

from dspark_trt.build.pipeline import BACKENDS, DTYPES, WEIGHTS, BuildOptions, build_engines
from dspark_trt.export.fused_target import LM_HEADS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2", help="target alias, .gguf file or HF directory")
    parser.add_argument("--draft", help="DeepSpec drafter directory (omit for a target-only engine)")
    parser.add_argument("--out", required=True, help="engine directory to write")
    parser.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                        help="onnxruntime: ONNX graphs for CPU (default); tensorrt: the TensorRT flavour of the "
                        "target graph, validated on ONNX Runtime, compiled into TensorRT plans (needs the tensorrt "
                        "package and an NVIDIA GPU)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="activations")
    parser.add_argument("--weights", choices=WEIGHTS,
                        help="int4: the target's projections and LM head carrying the GGUF's own blocks, as "
                        "MatMulNBits (onnxruntime) or blocked DequantizeLinear + MatMul (tensorrt); the default for "
                        "a .gguf target; fp32: float32 weights (default otherwise)")
    parser.add_argument("--accuracy-level", type=int, default=4, choices=(1, 4),
                        help="int4 weights: MatMulNBits compute, 4 = int8 activations as llama.cpp (default; a "
                        "row's result does not depend on the rows sharing its pass), 1 = float32")
    parser.add_argument("--draft-weights", choices=("fp32", "int8", "int4"),
                        help="the drafter graph's matmul weights: int8 (default on onnxruntime: integer GEMM, "
                        "drafts batch-invariant), int4 (MatMulNBits), fp32 (default on tensorrt; equals torch)")
    parser.add_argument("--lm-head", choices=LM_HEADS, default="gguf",
                        help="the fused graph's LM head: gguf (its own blocks, Q8_0 for SmolLM2; default: fastest for "
                        "a lone token) or fp32 (the same weights dequantized, read from the embedding table: about "
                        "1.2x faster for passes of 16+ rows on AVX2, 0.83x for one token; for batched serving and "
                        "gen-data)")
    parser.add_argument("--max-seq-len", type=int, help="context limit per request "
                        "(default: min(2048, the target's max positions))")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per target pass")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="max abs error vs torch allowed, relative to max(1, the reference's magnitude)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args: argparse.Namespace) -> int:
    manifest = build_engines(BuildOptions(out=args.out, target=args.target, draft=args.draft, backend=args.backend,
                                          dtype=args.dtype, weights=args.weights, accuracy_level=args.accuracy_level,
                                          draft_weights=args.draft_weights, lm_head=args.lm_head,
                                          max_seq_len=args.max_seq_len,
                                          max_batch_tokens=args.max_batch_tokens, tolerance=args.tolerance))
    if args.json:
        print(json.dumps(manifest))
    return 0
