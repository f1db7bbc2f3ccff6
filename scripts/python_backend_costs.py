"""What one python-backend call costs in a decoupled Triton python model: the calls `dspark_bls` and
postprocessing make per request per engine step, each a round trip between the stub and tritonserver.

Writes a throwaway one-model repository, starts a real tritonserver on it, and asks the model to time N calls
of each kind in a thread of its own (a decoupled model's responses are sent off the `execute` thread, as
`dspark_bls` does). Prints microseconds per call, three times.

    python scripts/python_backend_costs.py --calls 2000
"""
from __future__ import annotations

import argparse
import queue
import tempfile
from pathlib import Path

import numpy as np

CONFIG = """name: "costs"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "US" data_type: TYPE_FP64 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
MODEL = '''import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.family = pb_utils.MetricFamily(name="costs_gauge", description="a gauge to set",
                                            kind=pb_utils.MetricFamily.GAUGE)
        self.gauge = self.family.Metric(labels={})

    def execute(self, requests):
        threading.Thread(target=self._time, args=(requests,)).start()
        return None

    def _time(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            sender = request.get_response_sender()
            calls = [sender.is_cancelled, request.is_cancelled, lambda: self.gauge.set(1.0),
                     lambda: sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("US", np.zeros(4))]))]
            us = []
            for call in calls:
                start = time.perf_counter()
                for _ in range(n):
                    call()
                us.append((time.perf_counter() - start) / n * 1e6)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("US", np.array(us))]),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''
KINDS = ("response_sender.is_cancelled()", "request.is_cancelled()", "metric gauge set()", "response_sender.send()")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls of each kind per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import tritonclient.grpc as grpcclient

    from dspark_trt.serving.tritonserver import TritonServer

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "costs"
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(CONFIG)
        (model / "1" / "model.py").write_text(MODEL)
        with TritonServer(Path(tmp)) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            results: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            for _ in range(args.repeats):
                n = grpcclient.InferInput("N", [1], "INT32")
                n.set_data_from_numpy(np.array([args.calls], np.int32))
                client.async_stream_infer("costs", [n])
                while True:  # args.calls - 1 filler responses of zeros, then the timings
                    result, error = results.get(timeout=600)
                    if error is not None:
                        raise SystemExit(f"costs model failed: {error}")
                    us = result.as_numpy("US")
                    if us[0] != 0:
                        break
                print("  ".join(f"{kind} {value:.1f} us" for kind, value in zip(KINDS, us)), flush=True)
            client.stop_stream()


if __name__ == "__main__":
    main()
