"""TensorRT runtime: the engine directory's plans (built by `build-engines --backend tensorrt`) on a GPU,
and the same TensorRT-flavour target graph emulated on ONNX Runtime (CPU) for validation.

`TrtRuntime` is OrtRuntime with a `TrtSession` in place of each ONNX Runtime session (get_inputs,
get_outputs, run), so slots, rollback, the drafter's passes (`draft.plan`, and `context.plan` extending the
context of requests that do not draft) and in-graph verification are the ONNX Runtime path's own code. The target step depends on the graph the plans were built from:

- graph "trt" (export/trt_target.py, what `build-engines --backend tensorrt` exports): `TrtTargetGraph`
  keeps each layer's K and V cache as a persistent CUDA tensor [slots, kv_heads, capacity, head_dim],
  bound (set_tensor_address) as both `past_key_<i>` and `present_key_<i>`: TensorRT's KV-cache update
  writes the new rows in place and its attention reads them there, so no cache crosses the host
  boundary; per pass only the index feeds go up and logits/taps/verdicts come back. TensorRT 11
  requires an in-place (aliased) output to be a network output bound at its input's address; the
  runtime checks the plan's aliasing (get_aliased_input_tensor) where that API exists.
- graph "portable" (older engine directories): PortableTargetGraph over TrtSession, the host cache
  copied in and out each pass.

`TrtEmulationRuntime` runs a TensorRT-flavour engine directory on ONNX Runtime: TRT_KVCacheUpdate and
TRT_Attention as Python custom ops (plugins/trt_ops_ort.py), host caches copied in and out each pass
(a Python op cannot write in place). It is how the graph TensorRT compiles is checked against the torch
reference here; it is not a serving runtime. tensorrt is imported only when a TrtRuntime is built.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.fused_target import cache_names, fused_feeds
from dspark_trt.graphs.manifest import read_manifest, sha256
from dspark_trt.graphs.trt_target import GRAPH as TRT_GRAPH
from dspark_trt.graphs.trt_target import graph_capacity
from dspark_trt.graphs.verify_tail import VERIFY_OUTPUTS
from dspark_trt.runtimes.kv_cache import KVCache
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


def _cache_layout(config, num_slots: int, capacity: int) -> tuple[int, int, int, int]:
    return num_slots, config.num_kv_heads, capacity, config.head_dim


def _adopt_trt_graph(runtime: OrtRuntime, make_graph) -> None:
    """Swap a TensorRT-flavour target graph into an OrtRuntime that has just been built (its __init__ chose
    the portable graph class, whose constructor only keeps references). The graph keeps its own K/V buffers
    (of the graph's static capacity; on the GPU for TensorRT), so the runtime's host KVCache keeps slots and
    lengths only: its arrays are dropped. Requests are limited to that capacity."""
    capacity = graph_capacity(runtime.manifest["graphs"]["target"])
    runtime._target = make_graph(runtime.sessions["target"], runtime.cache, runtime.config, capacity)
    runtime.cache.k, runtime.cache.v = [], []
    runtime.max_seq_len = runtime.cache.max_seq_len = min(runtime.max_seq_len, capacity)
    runtime.verify_in_graph = set(VERIFY_OUTPUTS) <= set(runtime._target.outputs)


def _split_feeds(ids, slots, starts, lens, capacity: int, logits_rows, extra: dict):
    inputs = fused_feeds(np.asarray(ids, dtype=np.int64), slots, starts, lens, capacity, logits_rows)
    return inputs.feeds | extra, inputs.batch


class EmulatedTrtTargetGraph:
    """A TensorRT-flavour target graph on ONNX Runtime over host K/V buffers of the graph's capacity."""

    def __init__(self, session, cache: KVCache, config, capacity: int):
        from dspark_trt_plugins import trt_ops_ort

        self._check = trt_ops_ort.raise_pending
        self.session = session
        self.cache = cache
        self.capacity = capacity
        shape = _cache_layout(config, cache.num_slots, capacity)
        self._k = [np.zeros(shape, np.float32) for _ in range(config.num_layers)]
        self._v = [np.zeros(shape, np.float32) for _ in range(config.num_layers)]
        self._names = [o.name for o in session.get_outputs()]
        self.outputs = [n for n in self._names if not n.startswith("present_")]

    def __call__(self, input_ids, slots: np.ndarray, query_lens, logits_rows, extra: dict) -> dict:
        starts = self.cache.lengths.numpy()[slots]
        feeds, batch = _split_feeds(input_ids, slots, starts, query_lens, self.capacity, logits_rows, extra)
        for layer, (k, v) in enumerate(zip(self._k, self._v)):
            past_k, past_v, _, _ = cache_names(layer)
            feeds[past_k], feeds[past_v] = k[:batch], v[:batch]
        values = self.session.run(None, {i.name: feeds[i.name] for i in self.session.get_inputs()})
        self._check()
        results = dict(zip(self._names, values))
        for layer, (k, v) in enumerate(zip(self._k, self._v)):
            _, _, present_k, present_v = cache_names(layer)
            k[:batch], v[:batch] = results[present_k], results[present_v]  # TensorRT writes these in place
        return {name: results[name] for name in self.outputs}


class TrtEmulationRuntime(OrtRuntime):
    """A TensorRT-flavour engine directory (target graph "trt") run on ONNX Runtime, for validation."""

    name = "onnxruntime-trt-emulation"

    def __init__(self, engine_dir: str | Path, num_slots: int = 8, max_seq_len: int = 2048,
                 threads: int | None = None, use_drafter: bool = True):
        manifest = read_manifest(engine_dir)
        if manifest["target"].get("graph") != TRT_GRAPH:
            raise DSparkError(f"{engine_dir}: target graph '{manifest['target'].get('graph')}' is not the "
                              f"TensorRT flavour ('{TRT_GRAPH}'); run it with OrtRuntime")
        super().__init__(engine_dir, num_slots=num_slots, max_seq_len=max_seq_len, threads=threads,
                         use_drafter=use_drafter)
        _adopt_trt_graph(self, EmulatedTrtTargetGraph)

    def _make_session(self, engine_dir: Path, graph: str, threads: int | None):
        if graph != "target":
            return super()._make_session(engine_dir, graph, threads)
        from dspark_trt_plugins import ort_op, trt_ops_ort

        options = trt_ops_ort.session_options()
        if threads:
            options.intra_op_num_threads = threads
        return ort_op.inference_session(engine_dir / self.manifest["graphs"][graph]["file"], options)


def _torch_dtypes(trt) -> dict:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8, trt.uint8: torch.uint8,
            trt.bool: torch.bool}


def _device_tensor(shape: tuple, dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    """An uninitialised tensor of `shape`; a zero-size one still owns an allocation, so that its address,
    which TensorRT is given, is not null."""
    n = int(np.prod(shape)) if shape else 1
    return torch.empty(max(n, 1), dtype=dtype, device=device)[:n].view(shape)


class TrtSession:
    """One plan behind ONNX Runtime's session interface; outputs come back in the graph's order."""

    device = "cuda"

    def __init__(self, trt, runtime, plan_path: Path, graph_io: dict):
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise DSparkError(f"{plan_path}: TensorRT could not deserialize the plan "
                              "(built with another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._input_set = set(self.input_names)
        self._inputs = [SimpleNamespace(name=e["name"]) for e in graph_io["inputs"] if e["name"] in self._input_set]
        self._outputs = [SimpleNamespace(name=e["name"]) for e in graph_io["outputs"]]
        self.dtypes = {n: _torch_dtypes(trt)[self.engine.get_tensor_dtype(n)] for n in self.names}
        self.stream = torch.cuda.Stream()

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs

    def bind_input(self, name: str, value) -> torch.Tensor:
        """Copy a host feed to the GPU and bind it (shape and address); returns the device tensor."""
        t = torch.as_tensor(np.ascontiguousarray(value)).to(self.dtypes[name])
        device = _device_tensor(tuple(t.shape), t.dtype)
        device.copy_(t)
        self.bind(name, device)
        return device

    def bind(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._input_set and not self.context.set_input_shape(name, tuple(tensor.shape)):
            raise DSparkError(f"input '{name}' shape {tuple(tensor.shape)} is outside the plan's optimization "
                              "profile (see manifest.json plans.*.profile)")
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise DSparkError(f"TensorRT refused the address of '{name}'")

    def bind_output(self, name: str) -> torch.Tensor:
        shape = tuple(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise DSparkError(f"output '{name}' has an undetermined shape {shape}")
        tensor = _device_tensor(shape, self.dtypes[name])
        self.bind(name, tensor)
        return tensor

    def execute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())  # the feeds' copies
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DSparkError("TensorRT execution failed (its log says why)")
        self.stream.synchronize()

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        bound = {e.name: self.bind_input(e.name, feeds[e.name]) for e in self._inputs}
        bound |= {e.name: self.bind_output(e.name) for e in self._outputs}
        self.execute()
        return [bound[e.name].cpu().numpy() for e in self._outputs]


class TrtTargetGraph:
    """A TensorRT-flavour target plan whose K/V live in persistent CUDA tensors, bound in place."""

    def __init__(self, session: TrtSession, cache: KVCache, config, capacity: int):
        self.session = session
        self.cache = cache
        self.capacity = capacity
        shape = _cache_layout(config, cache.num_slots, capacity)
        self._k = [torch.zeros(shape, dtype=torch.float32, device=session.device) for _ in range(config.num_layers)]
        self._v = [torch.zeros(shape, dtype=torch.float32, device=session.device) for _ in range(config.num_layers)]
        engine = session.engine
        aliased = getattr(engine, "get_aliased_input_tensor", None)
        for layer in range(config.num_layers):
            past_k, past_v, present_k, present_v = cache_names(layer)
            for past, present in ((past_k, present_k), (past_v, present_v)):
                if present not in session.names or past not in session.input_names:
                    raise DSparkError(f"the target plan has no in-place cache pair {past} -> {present}")
                if aliased is not None and aliased(present) != past:
                    raise DSparkError(f"the target plan's output {present} does not alias its input {past} "
                                      f"(it aliases {aliased(present)!r}): rebuild the plans")
        self._caches = {n for layer in range(config.num_layers) for n in cache_names(layer)}
        self.outputs = [o.name for o in session.get_outputs() if o.name not in self._caches]
        self._feeds = [n for n in session.input_names if n not in self._caches]

    def __call__(self, input_ids, slots: np.ndarray, query_lens, logits_rows, extra: dict) -> dict:
        s = self.session
        starts = self.cache.lengths.numpy()[slots]
        feeds, batch = _split_feeds(input_ids, slots, starts, query_lens, self.capacity, logits_rows, extra)
        keep = [s.bind_input(name, feeds[name]) for name in self._feeds]  # alive until the run ends
        for layer, (k, v) in enumerate(zip(self._k, self._v)):
            past_k, past_v, present_k, present_v = cache_names(layer)
            for past, present, buffer in ((past_k, present_k, k), (past_v, present_v, v)):
                view = buffer[:batch]  # slots [0, batch): contiguous from the buffer's start
                s.bind(past, view)
                s.bind(present, view)  # the aliased in-place output: the same address
        outputs = {name: s.bind_output(name) for name in self.outputs}
        s.execute()
        del keep
        return {name: t.cpu().numpy() for name, t in outputs.items()}


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
        if self.manifest["target"].get("graph") == TRT_GRAPH:
            _adopt_trt_graph(self, TrtTargetGraph)

    def _make_session(self, engine_dir: Path, graph: str, threads: int | None) -> TrtSession:
        plan = self.manifest["plans"][graph]["file"]
        return TrtSession(self._trt, self._trt_runtime, engine_dir / plan, self.manifest["graphs"][graph])
