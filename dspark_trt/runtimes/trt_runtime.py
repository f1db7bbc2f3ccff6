"""TensorRT runtime: the engine directory's plans (built by `build-engines --backend tensorrt`) on a GPU.

It is OrtRuntime with a `TrtSession` in place of each ONNX Runtime session, which offers the part of
the session interface OrtRuntime uses (get_inputs, get_outputs, run). So slots, host-side caches,
rollback, the drafter's left-to-right loop and in-graph verification are the ONNX Runtime path's own
code; only graph execution moves to TensorRT: per call the feeds are copied into CUDA tensors,
`set_input_shape` / `set_tensor_address` bind them, `execute_async_v3` runs on the session's stream.
Caches stay on the host (copied in and out per pass): correct, not yet fast. tensorrt is imported when
a TrtRuntime is built, so the module imports anywhere.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.export.engines import read_manifest, sha256
from dspark_trt.runtimes.ort_runtime import OrtRuntime

TRT_UNAVAILABLE = "TensorRT/GPU not available on this machine"


def require_trt_runtime(engine_dir: str | Path):
    """The tensorrt module, or a DSparkError saying why these plans cannot run here."""
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    if trt is None or not torch.cuda.is_available():
        missing = "the `tensorrt` package" if trt is None else "a CUDA GPU"
        raise DSparkError(f"{engine_dir} holds TensorRT plans, which need {missing} ({TRT_UNAVAILABLE}); "
                          "rebuild it with `build-engines --backend onnxruntime` to run on CPU")
    return trt


class TrtSession:
    """One plan behind ONNX Runtime's session interface; outputs come back in the graph's order."""

    def __init__(self, trt, runtime, plan_path: Path, graph_io: dict):
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise DSparkError(f"{plan_path}: TensorRT could not deserialize the plan "
                              "(built with another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self._inputs = [SimpleNamespace(name=e["name"]) for e in graph_io["inputs"] if e["name"] in inputs]
        self._outputs = [SimpleNamespace(name=e["name"]) for e in graph_io["outputs"]]
        torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                        trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8,
                        trt.uint8: torch.uint8, trt.bool: torch.bool}
        self._dtypes = {n: torch_dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.stream = torch.cuda.Stream()

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        bound = {}
        for entry in self._inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[entry.name])).to("cuda", self._dtypes[entry.name])
            if not self.context.set_input_shape(entry.name, tuple(t.shape)):
                raise DSparkError(f"input '{entry.name}' shape {tuple(t.shape)} is outside the plan's "
                                  "optimization profile (see manifest.json plans.*.profile)")
            bound[entry.name] = t
        for entry in self._outputs:
            shape = tuple(self.context.get_tensor_shape(entry.name))
            if any(d < 0 for d in shape):
                raise DSparkError(f"output '{entry.name}' has an undetermined shape {shape}")
            bound[entry.name] = torch.empty(shape, dtype=self._dtypes[entry.name], device="cuda")
        for name, t in bound.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # the feeds' copies
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DSparkError("TensorRT execution failed (its log says why)")
        self.stream.synchronize()
        return [bound[e.name].cpu().numpy() for e in self._outputs]


class TrtRuntime(OrtRuntime):
    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, num_slots: int = 8, max_seq_len: int = 2048,
                 use_drafter: bool = True):
        engine_dir = Path(engine_dir)
        trt = require_trt_runtime(engine_dir)
        manifest = read_manifest(engine_dir)
        plans = manifest.get("plans") or {}
        if set(plans) != set(manifest["graphs"]):
            raise DSparkError(f"{engine_dir}: plans for {sorted(plans)} but graphs {sorted(manifest['graphs'])}; "
                              "rebuild with `build-engines --backend tensorrt`")
        limit = manifest["tensorrt"]["max_requests"]
        if num_slots > limit:
            raise DSparkError(f"{num_slots} slots, but the plans take at most {limit} requests per pass")
        for name, plan in plans.items():
            path = engine_dir / plan["file"]
            if not path.is_file() or sha256(path) != plan["sha256"]:
                raise DSparkError(f"{engine_dir}: plan '{name}' ({plan['file']}) is missing or was modified")
        from dspark_trt_plugins.trt_plugin import register_plugin

        register_plugin()  # a JIT plugin must be registered wherever its plan is deserialized
        self._trt, self._trt_runtime = trt, trt.Runtime(trt.Logger(trt.Logger.WARNING))
        super().__init__(engine_dir, num_slots=num_slots, max_seq_len=max_seq_len, threads=1,
                         use_drafter=use_drafter)

    def _make_session(self, engine_dir: Path, graph: str, threads: int | None) -> TrtSession:
        plan = self.manifest["plans"][graph]["file"]
        return TrtSession(self._trt, self._trt_runtime, engine_dir / plan, self.manifest["graphs"][graph])
