"""Preprocessing: the prompt through the target's chat template, stop and bad words to id lists.
Every input is checked by dspark_trt.serving.request_parsing; a bad one is answered INVALID_ARG."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.errors import DSparkError
from dspark_trt.graphs.manifest import load_tokenizer_dir
from dspark_trt.serving.ensemble import client_fields
from dspark_trt.serving.request_parsing import parse_text_request
from dspark_trt.serving.text import encode_word_list

FIELDS = client_fields("preprocessing")  # this model's input -> the ensemble field the client sent (errors name it)


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = load_tokenizer_dir(params["tokenizer_dir"]["string_value"])

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            inputs = {}
            for name, field in FIELDS.items():
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[field] = None if tensor is None else tensor.as_numpy()
            parsed = parse_text_request(inputs)
            ids = chat_prompt_ids(self.tokenizer, parsed.prompt)
            stop = encode_word_list(self.tokenizer, list(parsed.stop_words), "stop_words")
            bad = encode_word_list(self.tokenizer, list(parsed.bad_words), "bad_words")
        except DSparkError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        pad_id = parsed.pad_id if parsed.pad_id != -1 else parsed.end_id
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("INPUT_ID", np.asarray([ids], np.int32)),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(ids)]], np.int32)),
            pb_utils.Tensor("STOP_WORDS_IDS", stop[None]),
            pb_utils.Tensor("BAD_WORDS_IDS", bad[None]),
            pb_utils.Tensor("OUT_END_ID", np.array([[parsed.end_id]], np.int32)),
            pb_utils.Tensor("OUT_PAD_ID", np.array([[pad_id]], np.int32)),
        ])
