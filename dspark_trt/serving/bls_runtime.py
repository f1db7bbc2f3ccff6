"""The engine's Runtime split across Triton models: `dspark_target` and `dspark_draft` run the graphs,
`dspark_bls` reaches them by BLS calls.

The orchestrator keeps the slot bookkeeping (which slots are free, how many target K/V rows and
draft context rows each slot holds); the two models keep only the K/V buffers, addressed by slot.
Every call carries the lengths it assumes, so rollback and freeing a slot cost no round trip:
rows beyond a slot's length are simply overwritten by the next pass. `TargetService` and
`DraftService` are what the two models run (over an OrtRuntime on CPU); `call` is the transport
(a BLS exec in Triton, a direct call in tests).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.manifest import read_manifest
from dspark_trt.models.drafter import DraftStep
from dspark_trt.models.target import TargetConfig, TargetStep
from dspark_trt.runtimes.base import Runtime
from dspark_trt.runtimes.kv_cache import SlotTable
from dspark_trt.spec.sampling import is_greedy
from dspark_trt.spec.verify import VerifyResult

TARGET_MODEL = "dspark_target"
DRAFT_MODEL = "dspark_draft"
TARGET_OUTPUTS = ["logits", "taps"]
VERIFY_OUTPUTS = ["accepted", "next_token", "taps"]
DRAFT_OUTPUTS = ["tokens", "probs", "confidence_logits"]
DEAD_STUB = "is not healthy"  # tritonserver's words for a model whose process died...
SERVER_STOPPING = "Server not ready"  # ... and for a call made while it stops
RECOVERING = "the server is recovering"  # under `dspark-trt serve` (serving/supervisor.py)
STOPPING = "the server is restarting or stopping"
# call(model name, input arrays, wanted output names) -> output arrays
Call = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class BlsRuntime(Runtime):
    name = "triton-bls"

    def __init__(self, engine_dir: str | Path, call: Call, num_slots: int = 8, max_seq_len: int = 2048,
                 use_drafter: bool = True):
        manifest = read_manifest(engine_dir)
        config = TargetConfig(**manifest["target"]["config"])
        self.call = call
        self.vocab_size = config.vocab_size
        self.eos_token_ids = list(config.eos_token_ids)
        self.max_seq_len = min(max_seq_len, manifest.get("max_seq_len") or max_seq_len, config.max_position_embeddings)
        self.num_slots = num_slots
        draft = manifest["draft"] if use_drafter else None
        self.block_size = draft["block_size"] if draft else 0
        self.has_confidence_head = bool(draft and draft["confidence_head"])
        self.cache = SlotTable(num_slots, self.max_seq_len)  # the K/V buffers live in dspark_target
        self._lengths = self.cache.lengths.numpy()  # target K/V rows per slot (a view)
        self._context = np.zeros(num_slots, np.int64)  # draft context rows per slot

    def _reset_draft_context(self, slot: int) -> None:
        self._context[slot] = 0

    def target_forward(self, input_ids, slots, query_lens, logits_rows: str) -> TargetStep:
        slots_np, lens = np.asarray(slots, np.int64), np.asarray(query_lens, np.int64)
        out = self.call(TARGET_MODEL, {
            "input_ids": np.asarray(input_ids, np.int64), "slots": slots_np, "starts": self._lengths[slots_np],
            "query_lens": lens, "all_logits": np.array([logits_rows == "all"]),
        }, TARGET_OUTPUTS)
        self._lengths[slots_np] += lens
        taps = torch.from_numpy(out["taps"]) if self.block_size and out["taps"].size else None
        return TargetStep(logits=torch.from_numpy(out["logits"]), taps=taps)

    def target_verify(self, input_ids, slots, query_lens, draft_tokens, draft_probs, temperature, top_k, top_p,
                      uniforms, controls=None) -> tuple[TargetStep, VerifyResult]:
        """Verified in `dspark_target`'s graph: only the verdicts and taps come back, no logits. Greedy
        rounds send no draft probabilities (the op ignores them for greedy requests). A pass with `controls`
        brings the logits back and is verified here, on the controlled logits (Runtime.target_verify)."""
        if controls is not None:
            return super().target_verify(input_ids, slots, query_lens, draft_tokens, draft_probs, temperature,
                                         top_k, top_p, uniforms, controls)
        slots_np, lens = np.asarray(slots, np.int64), np.asarray(query_lens, np.int64)
        temperature = np.asarray(temperature, np.float32)
        probs = np.asarray(draft_probs, np.float32)
        out = self.call(TARGET_MODEL, {
            "input_ids": np.asarray(input_ids, np.int64), "slots": slots_np, "starts": self._lengths[slots_np],
            "query_lens": lens, "all_logits": np.array([True]),
            "draft_tokens": np.asarray(draft_tokens, np.int64),
            "draft_probs": probs[:0] if is_greedy(temperature).all() else probs,
            "temperature": temperature, "top_k": np.asarray(top_k, np.int64),
            "top_p": np.asarray(top_p, np.float32), "uniforms": np.asarray(uniforms, np.float32),
        }, VERIFY_OUTPUTS)
        self._lengths[slots_np] += lens
        taps = torch.from_numpy(out["taps"]) if self.block_size and out["taps"].size else None
        verdict = VerifyResult(accepted=torch.from_numpy(out["accepted"]), next_token=torch.from_numpy(out["next_token"]))
        return TargetStep(logits=torch.zeros(0, self.vocab_size), taps=taps), verdict

    def draft(self, slots, new_features, anchors, temperature, top_k, top_p, uniforms) -> DraftStep:
        slots_np = np.asarray(slots, np.int64)
        counts = np.array([0 if f is None else f.shape[0] for f in new_features], np.int64)
        width = next((f.shape[1] for f in new_features if f is not None), 0)
        features = np.concatenate([f.float().numpy() for f in new_features if f is not None and f.shape[0]]) \
            if counts.any() else np.zeros((0, width), np.float32)
        out = self.call(DRAFT_MODEL, {
            "slots": slots_np, "context_starts": self._context[slots_np], "features": features,
            "feature_counts": counts, "anchors": np.asarray(anchors, np.int64),
            "temperature": np.asarray(temperature, np.float32), "top_k": np.asarray(top_k, np.int64),
            "top_p": np.asarray(top_p, np.float32), "uniforms": np.asarray(uniforms, np.float64),
        }, DRAFT_OUTPUTS)
        self._context[slots_np] += counts
        conf = out.get("confidence_logits")
        return DraftStep(tokens=torch.from_numpy(out["tokens"]), probs=torch.from_numpy(out["probs"]),
                         confidence_logits=torch.from_numpy(conf) if conf is not None and conf.size else None)


class TargetService:
    """What `dspark_target` runs: one ragged target pass at the lengths the caller states."""

    def __init__(self, engine_dir: str | Path, num_slots: int):
        from dspark_trt.runtimes.ort_runtime import OrtRuntime
        from dspark_trt.serving.integrity import check_engine_files

        check_engine_files(engine_dir, graphs=["target"])
        self.runtime = OrtRuntime(engine_dir, num_slots=num_slots)  # with its drafter's taps, when it has one

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt = self.runtime
        slots = torch.as_tensor(inputs["slots"])
        rt.cache.lengths[slots] = torch.as_tensor(inputs["starts"])
        ids, lens = torch.as_tensor(inputs["input_ids"]), torch.as_tensor(inputs["query_lens"])
        if "draft_tokens" in inputs:  # a decode pass, verified in the graph's DSparkVerify node
            tokens, probs = torch.as_tensor(inputs["draft_tokens"]), torch.as_tensor(inputs["draft_probs"])
            if probs.shape[0] == 0:  # greedy: the op does not read them, but takes one row per draft
                probs = torch.zeros(len(tokens), rt.vocab_size)
            step, verdict = rt.target_verify(ids, slots, lens, tokens, probs,
                                             *(torch.as_tensor(inputs[k]) for k in ("temperature", "top_k", "top_p",
                                                                                   "uniforms")))
            return {"accepted": verdict.accepted.numpy(), "next_token": verdict.next_token.numpy(),
                    "taps": _taps(step)}
        step = rt.target_forward(ids, slots, lens,
                                 logits_rows="all" if bool(inputs["all_logits"].reshape(-1)[0]) else "last")
        return {"logits": step.logits.numpy(), "taps": _taps(step)}


def _taps(step: TargetStep) -> np.ndarray:
    taps = step.taps.numpy() if step.taps is not None else np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(taps, np.float32)


class DraftService:
    """What `dspark_draft` runs: extend each slot's draft context at the stated length, draft one block."""

    def __init__(self, engine_dir: str | Path, num_slots: int):
        from dspark_trt.graphs.draft_graph import GRAPH_NAMES
        from dspark_trt.runtimes.ort_runtime import OrtRuntime
        from dspark_trt.serving.integrity import check_engine_files

        check_engine_files(engine_dir, graphs=GRAPH_NAMES)
        self.runtime = OrtRuntime(engine_dir, num_slots=num_slots)
        if self.runtime.draft_config is None:
            raise DSparkError(f"{engine_dir}: the engines have no drafter for dspark_draft to run")

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt = self.runtime
        slots = torch.as_tensor(inputs["slots"])
        rt.drafter.context.lengths[slots] = torch.as_tensor(inputs["context_starts"])
        features = torch.from_numpy(inputs["features"])
        ends = np.cumsum(inputs["feature_counts"])
        per_slot = [features[end - count: end] if count else None
                    for end, count in zip(ends, inputs["feature_counts"])]
        step = rt.draft(slots, per_slot, torch.as_tensor(inputs["anchors"]), torch.as_tensor(inputs["temperature"]),
                        torch.as_tensor(inputs["top_k"]), torch.as_tensor(inputs["top_p"]),
                        torch.as_tensor(inputs["uniforms"]))
        conf = step.confidence_logits
        return {"tokens": step.tokens.numpy().astype(np.int64), "probs": step.probs.float().numpy(),
                "confidence_logits": np.zeros((0, 0), np.float32) if conf is None else conf.float().numpy()}


def service_model(service_class, pb_utils):
    """A Triton python model class serving service_class (one call per request, errors per request)."""

    class TritonPythonModel:
        def initialize(self, args):
            import json

            params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
            self.service = service_class(params["engine_dir"], int(params["num_slots"]))

        def execute(self, requests):
            responses = []
            for request in requests:
                try:
                    outputs = self.service({t.name(): t.as_numpy() for t in request.inputs()})
                except Exception as exc:  # noqa: BLE001 - the caller's engine fails the requests of this pass
                    error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                    responses.append(pb_utils.InferenceResponse(error=error))
                    continue
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()]))
            return responses

    return TritonPythonModel


def bls_call(pb_utils) -> Call:
    """The transport `dspark_bls` gives BlsRuntime: a synchronous BLS exec per call."""

    def call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        tensors = [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()]
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=tensors)
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            if DEAD_STUB in message:
                raise DSparkError(f"{model}'s process died ({message}): {RECOVERING}, retry in a few seconds")
            if SERVER_STOPPING in message:
                raise DSparkError(f"{model} is unavailable ({message}): {STOPPING}, retry in a few seconds")
            raise DSparkError(f"{model}: {message}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    return call
