"""Postprocessing: the new text of each streamed window of output ids (see dspark_trt.serving.text)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from dspark_trt.serving.text import new_text


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            window = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy().reshape(-1).tolist()
            prefix = int(pb_utils.get_input_tensor_by_name(request, "PREFIX_LENGTH").as_numpy().reshape(-1)[0])
            final = bool(pb_utils.get_input_tensor_by_name(request, "IS_FINAL").as_numpy().reshape(-1)[0])
            text = new_text(self.tokenizer, window, prefix, final)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT", np.array([[text.encode("utf-8")]], dtype=np.object_))]))
        return responses
