"""Postprocessing: the new text of each streamed window of output ids (see dspark_trt.serving.text).

A window that arrives cancelled (its client cancelled or went away) makes dspark_bls stop the request
it came from, which the ensemble itself never does (see dspark_trt.serving.cancellation)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from dspark_trt.graphs.manifest import load_tokenizer_dir
from dspark_trt.serving.cancellation import StopForwarder, bls_stop
from dspark_trt.serving.text import new_text


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = load_tokenizer_dir(params["tokenizer_dir"]["string_value"])
        self.stops = StopForwarder(bls_stop(pb_utils))

    def execute(self, requests):
        responses = []
        for request in requests:
            if request.is_cancelled():
                responses.append(self._cancelled(request))
                continue
            window = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy().reshape(-1).tolist()
            prefix = int(pb_utils.get_input_tensor_by_name(request, "PREFIX_LENGTH").as_numpy().reshape(-1)[0])
            final = bool(pb_utils.get_input_tensor_by_name(request, "IS_FINAL").as_numpy().reshape(-1)[0])
            text = new_text(self.tokenizer, window, prefix, final)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT", np.array([[text.encode("utf-8")]], dtype=np.object_))]))
        return responses

    def _cancelled(self, request):
        key = pb_utils.get_input_tensor_by_name(request, "REQUEST_KEY")
        if key is not None:
            try:
                self.stops.cancelled(int(key.as_numpy().reshape(-1)[0]))
            except Exception as exc:  # noqa: BLE001 - the request then runs to its end; serving goes on
                pb_utils.Logger.log_warn(f"postprocessing: could not stop a cancelled request: {exc}")
        return pb_utils.InferenceResponse(error=pb_utils.TritonError("request cancelled",
                                                                     pb_utils.TritonError.CANCELLED))
