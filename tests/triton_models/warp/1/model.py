"""Proves the stub runs our venv: numpy, torch and dspark_trt all import and compute."""
import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import dspark_trt
from dspark_trt.spec.sampling import warp_probs


class TritonPythonModel:
    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        logits = pb_utils.get_input_tensor_by_name(request, "LOGITS").as_numpy()
        temperature = float(pb_utils.get_input_tensor_by_name(request, "TEMPERATURE").as_numpy()[0])
        if not np.isfinite(logits).all():
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError("LOGITS must be finite", pb_utils.TritonError.INVALID_ARG))
        probs = warp_probs(torch.from_numpy(logits.copy()), temperature).numpy()
        peak = logits.max(axis=-1, keepdims=True)
        logsumexp = (np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)) + peak)[:, 0]
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("PROBS", probs.astype(np.float32)),
            pb_utils.Tensor("LOGSUMEXP", logsumexp.astype(np.float32)),
            pb_utils.Tensor("DSPARK_FILE", np.array([dspark_trt.__file__.encode()], dtype=np.object_)),
        ])
