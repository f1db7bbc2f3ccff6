"""Preprocessing: the prompt through the target's chat template, stop words to id lists."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.serving.text import encode_word_list


def _strings(request, name: str) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not valid UTF-8: {exc}") from None


def _int(request, name: str, default: int) -> int:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else int(tensor.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"]["string_value"])

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            texts = _strings(request, "QUERY")
            if len(texts) != 1:
                raise ValueError(f"text_input must hold one prompt per request, got {len(texts)}")
            if any(_strings(request, "BAD_WORDS_DICT")):
                raise ValueError("bad_words is not supported by dspark-trt yet; send an empty list")
            ids = chat_prompt_ids(self.tokenizer, texts[0])
            stop = encode_word_list(self.tokenizer, _strings(request, "STOP_WORDS_DICT"))
            end_id = _int(request, "END_ID", -1)  # -1: the target's own end-of-sequence ids
            pad_id = _int(request, "PAD_ID", end_id)
        except ValueError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("INPUT_ID", np.asarray([ids], np.int32)),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(ids)]], np.int32)),
            pb_utils.Tensor("STOP_WORDS_IDS", stop[None]),
            pb_utils.Tensor("OUT_END_ID", np.array([[end_id]], np.int32)),
            pb_utils.Tensor("OUT_PAD_ID", np.array([[pad_id]], np.int32)),
        ])
