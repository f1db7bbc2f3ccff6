"""What the `dspark_target` and `dspark_draft` Triton models run (TargetService, DraftService: one graph
pass per BLS request from dspark_bls's BlsRuntime, runtimes/bls_runtime.py, at the lengths it states: the target
graph alone on an OrtRuntime, the drafter's graph alone on an OrtDrafter, on CPU), the python model class around
them, and the BLS transport dspark_bls gives BlsRuntime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.models.target import TargetStep
from dspark_trt.runtimes.bls_runtime import Call

DEAD_STUB = "is not healthy"  # tritonserver's words for a model whose process died...
SERVER_STOPPING = "Server not ready"  # ... and for a call made while it stops
RECOVERING = "the server is recovering"  # under `dspark-trt serve` (serving/supervisor.py)
STOPPING = "the server is restarting or stopping"


def single_threaded_torch() -> None:
    """For a served model's process: its torch work is bookkeeping on a few rows, while ONNX Runtime's threads
    run the graphs, in this process or another. torch's OpenMP workers, idle between those small ops, spin and
    take the cores from the graphs; served with one torch thread per process, throughput rose about 10% at
    concurrency 1 and 16 (docs/benchmarks.md, served vs in-process)."""
    torch.set_num_threads(1)


class TargetService:
    """What `dspark_target` runs: one ragged target pass at the lengths the caller states."""

    def __init__(self, engine_dir: str | Path, num_slots: int):
        from dspark_trt.graphs.integrity import check_engine_files
        from dspark_trt.runtimes.ort_runtime import OrtRuntime

        check_engine_files(engine_dir, graphs=["target"])
        # the target graph alone, with its drafter's taps when it has one (the drafter runs in dspark_draft)
        self.runtime = OrtRuntime(engine_dir, num_slots=num_slots, use_drafter=False, taps=True)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt = self.runtime
        slots = torch.as_tensor(inputs["slots"])
        rt.cache.lengths[slots] = torch.as_tensor(inputs["starts"])
        ids, lens = torch.as_tensor(inputs["input_ids"]), torch.as_tensor(inputs["query_lens"])
        if "draft_tokens" in inputs:  # a decode pass, verified in the graph's DSparkVerify node
            tokens, probs = torch.as_tensor(inputs["draft_tokens"]), torch.as_tensor(inputs["draft_probs"])
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
    """What `dspark_draft` runs: extend each slot's draft context at the stated length, then draft one block; a
    call without anchors only extends (`context` graph: a request that does not draft this step, so that no
    backlog of rows is ever shipped) and returns nothing. It loads the drafter's graphs and context caches only:
    the target graph and its K/V live in dspark_target."""

    def __init__(self, engine_dir: str | Path, num_slots: int):
        from dspark_trt.graphs.draft_graph import GRAPH_NAMES
        from dspark_trt.graphs.integrity import check_engine_files
        from dspark_trt.graphs.manifest import read_manifest
        from dspark_trt.runtimes.ort_drafter import OrtDrafter
        from dspark_trt.runtimes.ort_runtime import context_limit

        manifest = read_manifest(engine_dir)
        if manifest["draft"] is None:
            raise DSparkError(f"{engine_dir}: the engines have no drafter for dspark_draft to run")
        check_engine_files(engine_dir, graphs=GRAPH_NAMES)
        self.drafter = OrtDrafter(engine_dir, manifest, num_slots, context_limit(manifest)[0])

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        drafter = self.drafter
        slots = torch.as_tensor(inputs["slots"])
        drafter.context.lengths[slots] = torch.as_tensor(inputs["context_starts"])
        features = torch.from_numpy(inputs["features"])
        ends = np.cumsum(inputs["feature_counts"])
        per_slot = [features[end - count: end] if count else None
                    for end, count in zip(ends, inputs["feature_counts"])]
        if "anchors" not in inputs:
            drafter.extend_context(slots, per_slot)
            return {}
        step = drafter.draft(slots, per_slot, torch.as_tensor(inputs["anchors"]),
                             torch.as_tensor(inputs["temperature"]), torch.as_tensor(inputs["top_k"]),
                             torch.as_tensor(inputs["top_p"]), torch.as_tensor(inputs["uniforms"]))
        conf = step.confidence_logits
        return {"tokens": step.tokens.numpy().astype(np.int64), "probs": step.probs.float().numpy(),
                "confidence_logits": np.zeros((0, 0), np.float32) if conf is None else conf.float().numpy()}


def service_model(service_class, pb_utils):
    """A Triton python model class serving service_class (one call per request, errors per request)."""

    class TritonPythonModel:
        def initialize(self, args):
            import json

            single_threaded_torch()
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
