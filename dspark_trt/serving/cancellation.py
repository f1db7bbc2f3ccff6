"""Cancelling a stream that a client sent to the ensemble.

Triton 2.51's ensemble never cancels a step that is already running (core PR #263 checks the
client's cancellation only when it schedules the next step), so the long-running `dspark_bls` step
does not hear that its client cancelled or disconnected. Every `postprocessing` request the ensemble
schedules after that does arrive with `is_cancelled()` true (checked on 2.51 for a gRPC stream cancel
and for an HTTP generate_stream client that went away). So `dspark_bls` tags each response with its
request's key, and postprocessing, on the first cancelled window of a key, sends `dspark_bls` a stop
request for it: TensorRT-LLM's `stop` input pattern, addressed by key instead of request id (ids are
the client's and need not be unique). Keys are random 63-bit numbers that never leave the server, so
one client cannot stop another's request.
"""
from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Callable

import numpy as np

from dspark_trt.errors import DSparkError

ORCHESTRATOR_MODEL = "dspark_bls"
REMEMBERED_KEYS = 4096  # stops already sent; a cancelled stream yields a few more windows before it ends


def new_request_key() -> int:
    return secrets.randbits(63)


class StopForwarder:
    """Sends one stop per cancelled key: later windows of the same stream are cancelled too, and the
    orchestrator needs to hear it once."""

    def __init__(self, send_stop: Callable[[int], None], remember: int = REMEMBERED_KEYS):
        self._send_stop = send_stop
        self._remember = remember
        self._sent: OrderedDict[int, None] = OrderedDict()

    def cancelled(self, key: int) -> None:
        if key in self._sent:
            return
        self._sent[key] = None
        if len(self._sent) > self._remember:
            self._sent.popitem(last=False)
        self._send_stop(key)


def bls_stop(pb_utils, model: str = ORCHESTRATOR_MODEL) -> Callable[[int], None]:
    """send_stop for postprocessing: a BLS stop request to the (decoupled) orchestrator model."""

    def send(key: int) -> None:
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=[], inputs=[
            pb_utils.Tensor("stop", np.array([[True]], np.bool_)),
            pb_utils.Tensor("request_key", np.array([[key]], np.uint64))])
        for response in request.exec(decoupled=True):
            if response.has_error():
                raise DSparkError(f"{model} refused the stop request: {response.error().message()}")

    return send
