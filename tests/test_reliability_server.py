"""Reliability on a real tritonserver (one for the module, the tiny engines, one slot, a queue of one):
every row of the bad-input table over gRPC and HTTP, overload refused at once, and serving goes on."""
import json
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import packaged_server
from test_reliability import BAD_INPUTS, GOOD, request_fields
from test_triton_serving import NEVER, TIMEOUT_S, engines, http_post, metrics, pair  # noqa: F401 - shared

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):  # noqa: F811
    with packaged_server(engines, tmp_path_factory.mktemp("reliability"), schedule="fixed", num_slots=1,
                         max_queue_size=1) as running:
        yield running


def grpc_request(server, fields: dict[str, np.ndarray]) -> tuple[str | None, str]:
    """(error message or None, generated text) of one ensemble request on its own gRPC stream."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    inputs = []
    for name, array in fields.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
        inputs[-1].set_data_from_numpy(array)
    try:
        client.async_stream_infer("ensemble", inputs, enable_empty_final_response=True)
        text = ""
        while True:
            result, error = events.get(timeout=TIMEOUT_S)
            if error is not None:
                return error.message(), text
            response = result.get_response()
            if any(o.name == "text_output" for o in response.outputs):
                text += result.as_numpy("text_output").reshape(-1)[0].decode()
            if response.parameters["triton_final_response"].bool_param:
                return None, text
    finally:
        client.stop_stream()
        client.close()


def as_json(fields: dict[str, np.ndarray]) -> dict:
    """The HTTP generate body of the same fields: a [1, 1] tensor is a scalar, a [1, N] one a list."""
    def value(item):
        return item.decode() if isinstance(item, bytes) else item.item() if hasattr(item, "item") else item

    return {name: value(array[0, 0]) if array.shape == (1, 1) else [value(v) for v in array[0]]
            for name, array in fields.items()}


@pytest.mark.parametrize("changes, field, over_http", [r[1:] for r in BAD_INPUTS], ids=[r[0] for r in BAD_INPUTS])
def test_each_bad_input_gets_an_error_naming_the_field_over_grpc_and_http(server, changes, field, over_http):
    fields = request_fields(changes)
    error, text = grpc_request(server, fields)
    assert error is not None and field in error, (error, text)
    if over_http:  # rows JSON cannot express (NaN, raw bytes, typed numbers) are gRPC only
        status, body = http_post(server.http_url, "generate", as_json(fields))
        assert status == 400 and field in json.loads(body)["error"], (status, body)


def assert_a_normal_request_succeeds(server):
    error, text = grpc_request(server, GOOD)
    assert error is None and 0 < len(text.split()) <= 2
    status, body = http_post(server.http_url, "generate", as_json(GOOD))
    assert status == 200 and json.loads(body)["text_output"] == text


def test_after_the_bad_inputs_a_normal_request_succeeds(server):
    assert_a_normal_request_succeeds(server)


def test_beyond_the_queue_requests_are_refused_as_overloaded_and_serving_goes_on(server):
    body = {"text_input": "w5 w6", "max_tokens": 40, "end_id": NEVER}  # long enough to hold the only slot
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: http_post(server.http_url, "generate", body), range(8)))
    served = [b for status, b in answers if status == 200]
    refused = [(status, json.loads(b)["error"]) for status, b in answers if status != 200]
    assert served and refused, answers
    # dspark_bls answers UNAVAILABLE; tritonserver 2.51's ensemble passes the message on as a 400
    assert all(status == 400 and "overloaded: 1 requests already waiting (max_queue_size 1)" in error
               for status, error in refused), refused
    assert all(len(json.loads(b)["text_output"].split()) <= 40 for b in served)
    assert metrics(server)["dspark_num_requests_waiting"] == 0
    assert_a_normal_request_succeeds(server)
