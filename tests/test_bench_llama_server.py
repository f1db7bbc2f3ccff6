"""llama.cpp's server as a `bench load` peer (bench/llama_cpp_server.py): the real llama-cpp-python server on
the target's GGUF where its server extra is installed (`make peers`), else skipped with that reason; and the
reason a missing extra gives everywhere."""
import json
import sys

import pytest

from dspark_trt.bench.llama_cpp_server import LlamaCppServer, closed_loop_http, start_peer
from dspark_trt.bench.load import digest
from dspark_trt.errors import DSparkError

PROMPTS = ("What is 7 times 8?", "Name a color.")


def test_a_missing_server_extra_names_the_package_and_how_to_install_it(monkeypatch, tmp_path):
    from dspark_trt.models.sources import resolve_model

    try:
        resolve_model("smollm2")
    except DSparkError as exc:
        pytest.skip(str(exc))
    monkeypatch.setitem(sys.modules, "sse_starlette", None)  # an import of it fails, as where it is not installed
    server, reason = start_peer("smollm2", 64, 1, tmp_path / "server.log")
    assert server is None and "llama-cpp-python" in reason and "make peers" in reason
    assert not (tmp_path / "server.log").exists()  # nothing was started


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server on the smollm2 GGUF (1 thread: the machine is shared), the tokenizer, the templated prompts."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (`make peers`)")
    pytest.importorskip("sse_starlette", reason="llama-cpp-python's server extra not installed (`make peers`)")
    from dspark_trt.engine.prompts import chat_prompt_text
    from dspark_trt.models.sources import load_tokenizer, resolve_model

    source = resolve_model("smollm2")
    tokenizer = load_tokenizer(source)
    texts = [chat_prompt_text(tokenizer, p) for p in PROMPTS]
    with LlamaCppServer(source.path, 160, 1, tmp_path_factory.mktemp("llama") / "server.log") as server:
        yield server, tokenizer, texts, source


def test_the_server_closed_loop_decodes_greedily_what_llama_cpp_decodes_in_process(served):
    from dspark_trt.bench.llama_cpp_peer import LlamaCppPeer

    server, tokenizer, texts, source = served
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    records = closed_loop_http(server.host, server.port, texts, 12, 2, 4, None, count)
    assert sorted(r.prompt for r in records) == [0, 0, 1, 1]  # round robin, every request answered
    assert all(0 < r.tokens <= 12 and r.submit <= r.first_token <= r.finish for r in records)
    # the first round's budgets ramp (6, 12: bench/load.request_budget), then every request's is 12
    assert sorted(r.max_tokens for r in records) == [6, 12, 12, 12]
    # the same prompt twice at one budget (greedy, the second from the first's cached prefix): the same answer
    assert len({r.output_digest for r in records if r.prompt == 1}) == 1
    # and it is llama.cpp's own greedy answer in this process, from our template's token ids
    local = LlamaCppPeer(source.path, 160, 1)
    eos = (local.llm.token_eos(),)
    for index, text in enumerate(texts):
        ids = local.generate(tokenizer.encode(text, add_special_tokens=False), 12, eos).output_ids
        answer = local.llm.detokenize([t for t in ids if t not in eos]).decode()
        record = next(r for r in records if r.prompt == index and r.max_tokens == 12)
        assert count(answer) == record.tokens and digest(answer) == record.output_digest


def test_the_server_peer_records_what_ran_and_names_bad_requests(served):
    import http.client

    server, tokenizer, texts, _ = served
    described = server.describe()
    assert described["n_threads"] == described["n_threads_batch"] == 1 and described["interrupt_requests"] is False
    assert described["sampling"]["temperature"] == 0.0 and described["sampling"]["repeat_penalty"] == 1.0
    # a prompt over the context it was made for fails inside the stream (HTTP 200, then nothing): an error, not
    # an empty answer counted as a finished request
    with pytest.raises(DSparkError, match="ended before"):
        closed_loop_http(server.host, server.port, [texts[0] * 20], 8, 1, 1, None, len)
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)  # and it still serves
    connection.request("GET", "/v1/models")
    assert json.loads(connection.getresponse().read())["data"]


def test_a_server_that_cannot_start_raises_with_its_log(tmp_path):
    pytest.importorskip("sse_starlette", reason="llama-cpp-python's server extra not installed (`make peers`)")
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really")
    server = LlamaCppServer(bad, 64, 1, tmp_path / "server.log")
    with pytest.raises(DSparkError, match="exited with code"):
        server.start(timeout_s=60)
