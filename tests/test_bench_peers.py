"""The peers of `bench ar` and `bench speedup`.

onnxruntime-genai: skipped with a reason where it is not installed, built once and cached by the weights'
sha256, its build failures explained, its row and agreement measured right. Nothing here builds the real
genai model; the tests on the real one are `slow` and skip unless it is cached.

llama.cpp (llama-cpp-python): skipped with a reason where absent or where the target is no GGUF; where
installed, on the real GGUF: the token budget or EOS, threads and quantization recorded, greedy really
greedy, every request prefilled whole, prompt lookup equal to plain decoding.

bench speedup: per-domain aggregation on hand-built rows, the table, and a tiny end to end run per domain."""
import hashlib
import json
import sys
import types

import pytest

from test_cli_spec import pair  # noqa: F401 - the tiny target + drafter fixture, shared

from dspark_trt.bench import ar, peers
from dspark_trt.bench.llama_cpp_peer import LLAMA_NAME, LlamaCppPeer, llama_cpp_peer, peer_name
from dspark_trt.bench.speedup import AR, DSPARK, prompt_domain, speedup_table, summarize
from dspark_trt.errors import DSparkError
from dspark_trt.cache import cache_dir
from dspark_trt.models.sources import ModelSource
from dspark_trt.spec.cost_table import CostTable

REAL_PEERS = cache_dir() / "peers"  # where `bench ar` caches the real model (read before any test moves it)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every build these tests provoke lands in tmp_path/cache, never in the user's cache."""
    monkeypatch.setenv("DSPARK_TRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_genai(monkeypatch):
    """onnxruntime_genai cannot be imported (None in sys.modules makes `import` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)


@pytest.fixture
def fake_genai(monkeypatch):
    """An importable stand-in for onnxruntime_genai and onnx_ir (enough to reach the builder)."""
    module = types.ModuleType("onnxruntime_genai")
    module.__version__ = "0.0-test"
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", module)
    monkeypatch.setitem(sys.modules, "onnx_ir", types.ModuleType("onnx_ir"))
    return module


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "weights" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 50)
    return ModelSource("gguf", path)


# --- skipped with a reason --------------------------------------------------------------------------------

def test_absent_package_is_skipped_with_the_install_hint(no_genai, gguf, private_cache):
    with pytest.raises(peers.PeerUnavailable) as exc:
        peers.import_genai()
    assert "onnxruntime-genai not installed" in exc.value.reason
    assert "pip install -e '.[peers]'" in exc.value.reason
    peer, reason = peers.genai_peer(gguf, None, None, None, 2, lambda msg: None)
    assert peer is None and reason == exc.value.reason
    assert not private_cache.exists()  # nothing was built on the way
    row = ar._peer_row("onnxruntime_genai", peers.GENAI_NAME, None, reason, {}, {}, {})
    assert row == {"name": "onnxruntime-genai", "status": "skipped", "reason": reason}
    table = ar.ar_decode_table({"new_tokens": 8, "repeats": 1, "ours_decode_tokens_per_second": 30.0,
                                "transformers_decode_tokens_per_second": 20.0, "peers": [row]})
    assert f"onnxruntime-genai            skipped: {reason}" in table


def test_absent_package_skips_even_with_a_named_model(no_genai, gguf, tmp_path):
    peer, reason = peers.genai_peer(gguf, None, None, str(tmp_path), 2, lambda msg: None)
    assert peer is None and "not installed" in reason


def test_builder_needs_onnx_ir(fake_genai, monkeypatch, gguf, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx_ir", None)
    with pytest.raises(peers.PeerUnavailable, match="onnx_ir not installed.*model builder needs it"):
        peers.prepare_genai_model(gguf, root=tmp_path / "peers")
    peer, reason = peers.genai_peer(gguf, None, None, None, 2, lambda msg: None)
    assert peer is None and "onnx_ir not installed" in reason


# --- built once, keyed by the weights -----------------------------------------------------------------------

def test_cache_key_is_the_weights_sha256_and_accuracy_level(gguf, tmp_path):
    sha = peers.weights_sha256(gguf)
    assert sha == hashlib.sha256(gguf.path.read_bytes()).hexdigest()
    root = tmp_path / "peers"
    default, level1 = peers.genai_model_dir(sha, None, root), peers.genai_model_dir(sha, 1, root)
    assert default.parent == root and sha[:16] in default.name and default != level1
    gguf.path.write_bytes(gguf.path.read_bytes() + b"x")  # other weights, other model
    assert peers.genai_model_dir(peers.weights_sha256(gguf), None, root) != default


def _fake_builder(script_body: str):
    """builder_command replaced by a Python one-liner getting (out dir) as argv[1]."""
    def command(hf_dir, out, accuracy_level=None):
        return [sys.executable, "-c", script_body, str(out), str(accuracy_level)]
    return command


FAKE_BUILD = """
import json, sys
from pathlib import Path
import onnx
from onnx import TensorProto, helper
out = Path(sys.argv[1]); out.mkdir(parents=True)
level = 4 if sys.argv[2] == "None" else int(sys.argv[2])
print("fake builder: int4, accuracy level", level)
node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=64, N=8, bits=4,
                        block_size=32, accuracy_level=level)
graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
onnx.save(helper.make_model(graph), str(out / "model.onnx"))
(out / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
"""


def test_prepare_builds_once_and_records_what_it_built(fake_genai, monkeypatch, gguf, tmp_path):
    calls = []
    monkeypatch.setattr(peers, "write_hf_dir", lambda source, out, loaded=None: calls.append(out))
    monkeypatch.setattr(peers, "builder_command", _fake_builder(FAKE_BUILD))
    root = tmp_path / "peers"
    messages = []
    model_dir = peers.prepare_genai_model(gguf, accuracy_level=1, root=root, progress=messages.append)
    assert model_dir == peers.genai_model_dir(peers.weights_sha256(gguf), 1, root)
    manifest = json.loads((model_dir / peers.PEER_MANIFEST).read_text())
    assert manifest["source_sha256"] == peers.weights_sha256(gguf)
    assert (manifest["precision"], manifest["bits"], manifest["block_size"], manifest["accuracy_level"]) == \
        ("int4", 4, 32, 1)
    assert manifest["onnxruntime_genai"] == "0.0-test"
    assert str(tmp_path) not in json.dumps(manifest["builder_command"])  # no paths of deleted work directories
    assert "fake builder" in (model_dir / peers.BUILDER_LOG).read_text()
    assert any("model builder" in m for m in messages) and any("built" in m for m in messages)
    assert [p.name for p in root.iterdir()] == [model_dir.name]  # no work directory left behind
    # cached: a second call builds nothing, even without the builder's dependencies
    monkeypatch.setitem(sys.modules, "onnx_ir", None)
    assert peers.prepare_genai_model(gguf, accuracy_level=1, root=root) == model_dir
    assert len(calls) == 1


def test_builder_failure_is_explained_and_leaves_no_model(fake_genai, monkeypatch, gguf, tmp_path):
    monkeypatch.setattr(peers, "write_hf_dir", lambda source, out, loaded=None: None)
    monkeypatch.setattr(peers, "builder_command",
                        _fake_builder("import sys; print('boom: no such architecture'); sys.exit(3)"))
    root = tmp_path / "peers"
    with pytest.raises(DSparkError, match=r"(?s)model builder failed \(exit 3\).*boom: no such architecture"):
        peers.prepare_genai_model(gguf, root=root)
    model_dir = peers.genai_model_dir(peers.weights_sha256(gguf), None, root)
    assert not model_dir.exists()
    kept = model_dir.with_name(model_dir.name + ".failed.log")
    assert "boom" in kept.read_text()
    assert sorted(p.name for p in root.iterdir()) == [kept.name]

def test_failed_automatic_build_skips_the_row_with_the_reason(fake_genai, monkeypatch, gguf, private_cache):
    monkeypatch.setattr(peers, "write_hf_dir", lambda source, out, loaded=None: None)
    monkeypatch.setattr(peers, "builder_command", _fake_builder("import sys; sys.exit(2)"))
    peer, reason = peers.genai_peer(gguf, None, None, None, 2, lambda msg: None)
    assert peer is None and "could not be built" in reason and "exit 2" in reason
    assert (private_cache / "peers").is_dir()  # built (and failed) in the cache, not elsewhere


def test_read_model_info_without_matmulnbits_is_fp32(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "m.onnx"}}}))
    info = peers.read_model_info(tmp_path)
    assert info["precision"] == "fp32" and info["accuracy_level"] is None and info["operators"] == {"Identity": 1}


# --- the row ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,at", [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1),
                                    ([7, 2], [1, 2], 0), ([1, 2, 3], [1, 2], 2), ([], [], None)])
def test_first_divergence(a, b, at):
    assert peers.first_divergence(a, b) == at
    assert peers.first_divergence(b, a) == at


def test_agreement():
    assert peers.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {
        "token_identical": False, "first_divergence": 2, "agreeing_prefix_tokens": 2, "compared_tokens": 4}
    assert peers.agreement([1, 2], [1, 2])["agreeing_prefix_tokens"] == 2


class _Peer(peers.GenaiPeer):
    def __init__(self):  # nothing loaded: only what it says it runs
        pass

    def describe(self):
        return {"onnxruntime_genai": "0.18.0", "precision": "int4", "block_size": 32, "accuracy_level": 4,
                "intra_op_num_threads": 2}


def test_ran_row_ratio_is_ours_over_the_peer_and_names_what_ran():
    tps = {"ours": 20.0, "onnxruntime": 60.0, "onnxruntime_genai": 100.0}
    decode = {"ours": 25.0, "onnxruntime": 150.0, "onnxruntime_genai": 120.0}
    agreement = {"ours": peers.agreement([1, 2, 3], [1, 2, 4]), "onnxruntime": peers.agreement([1, 2, 3], [1, 2, 4])}
    row = ar._peer_row("onnxruntime_genai", peers.GENAI_NAME, _Peer(), None, tps, decode, agreement)
    assert row["status"] == "ran" and row["decode_tokens_per_second"] == 120.0
    assert row["ours_decode_ratio"] == pytest.approx(25 / 120)
    assert row["onnxruntime_decode_ratio"] == pytest.approx(150 / 120)
    table = ar.ar_decode_table({"new_tokens": 128, "repeats": 3, "ours_decode_tokens_per_second": 25.0,
                                "onnxruntime_decode_tokens_per_second": 150.0,
                                "transformers_decode_tokens_per_second": 20.0, "peers": [row]})
    assert "ours (onnxruntime) / peer 1.25x" in table
    assert "diverge at position 2 of 3" in table
    assert "onnxruntime-genai 0.18.0, int4 (block 32, accuracy level 4), 2 threads" in table
    # without engines the ratio is against our torch runtime
    del decode["onnxruntime"]
    row = ar._peer_row("onnxruntime_genai", peers.GENAI_NAME, _Peer(), None, tps, decode,
                       {"ours": agreement["ours"]})
    assert "onnxruntime_decode_ratio" not in row
    assert "ours (ours) / peer 0.21x" in ar.ar_decode_table({"new_tokens": 128, "repeats": 3, "peers": [row]})


# --- the command line ---------------------------------------------------------------------------------------

def test_cli_options(monkeypatch):
    from dspark_trt.cli import build_parser
    from dspark_trt.commands import bench

    args = build_parser().parse_args(["bench", "ar", "--no-genai", "--genai-accuracy-level", "1"])
    assert args.no_genai and args.genai_accuracy_level == 1 and args.genai_model is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "ar", "--genai-accuracy-level", "7"])
    args = build_parser().parse_args(["bench", "ar", "--genai-model", "/x", "--genai-accuracy-level", "1"])
    monkeypatch.setattr("dspark_trt.bench.ar.bench_ar", lambda *a, **k: pytest.fail("must not run"))
    with pytest.raises(DSparkError, match="--genai-accuracy-level applies to the built peer model"):
        bench.run(args)
    seen = {}
    monkeypatch.setattr("dspark_trt.bench.ar.bench_ar", lambda *a, **k: seen.update(k) or _RESULT)
    args = build_parser().parse_args(["bench", "ar", "--no-genai", "--json"])
    assert bench.run(args) == 0
    assert seen == {"genai": False, "genai_model": None, "genai_accuracy_level": None, "llama_cpp": True}
    args = build_parser().parse_args(["bench", "ar", "--no-llama-cpp", "--json"])
    assert bench.run(args) == 0 and seen["llama_cpp"] is False and seen["genai"] is True


_RESULT = {"benchmark": "ar", "new_tokens": 8, "repeats": 1, "ours_tokens_per_second": 1.0,
           "transformers_tokens_per_second": 1.0, "ratio": 1.0, "token_identical": True,
           "peers": [{"name": "onnxruntime-genai", "status": "skipped", "reason": "not requested (--no-genai)"}]}


# --- the real peer, only where it is installed and its model already cached ----------------------------------

def _cached_real_model():
    pytest.importorskip("onnxruntime_genai")
    from dspark_trt.models.sources import resolve_model

    try:
        source = resolve_model("smollm2")
    except DSparkError as exc:
        pytest.skip(str(exc))
    model_dir = peers.genai_model_dir(peers.weights_sha256(source), root=REAL_PEERS)
    if not peers.is_built(model_dir):
        pytest.skip(f"no cached onnxruntime-genai model at {model_dir} (`dspark-trt bench ar` builds it)")
    return model_dir


@pytest.mark.slow
def test_real_peer_generates_exactly_and_reports_what_ran():
    model_dir = _cached_real_model()
    peer = peers.GenaiPeer(model_dir, threads=1)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 20355, 2, 198, 1, 520, 9531, 198]
    run = peer.generate(prompt, 6)
    assert len(run.output_ids) == 6 and 0 < run.first_token_seconds < run.seconds
    assert peer.generate(prompt, 6).output_ids == run.output_ids  # greedy
    # as bench speedup runs it: up to and with EOS ("What is 2+2? Answer with one number." -> "2+2 = 4<|im_end|>")
    short = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
             2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 19842, 351, 582, 1230, 30, 2, 198, 1, 520, 9531, 198]
    stopped = peer.generate(short, 48, (2,)).output_ids
    assert len(stopped) < 48 and stopped[-1] == 2 and 2 not in stopped[:-1]
    described = peer.describe()
    assert described["intra_op_num_threads"] == 1 and described["precision"] == "int4"
    assert described["accuracy_level"] in (0, 1, 2, 3, 4) and described["block_size"] == 32


@pytest.mark.slow
def test_bench_ar_has_the_genai_row_and_keeps_its_keys():
    model_dir = _cached_real_model()
    result = ar.bench_ar("smollm2", "What is 2+2?", 6, 1, genai_model=str(model_dir))
    for key in ("ours_tokens_per_second", "transformers_tokens_per_second", "ratio", "token_identical",
                "ours_decode_tokens_per_second"):
        assert key in result
    row = result["peers"][0]
    assert row["status"] == "ran", row
    assert row["ours_decode_ratio"] == pytest.approx(result["ours_decode_tokens_per_second"]
                                                     / row["decode_tokens_per_second"])
    assert row["description"]["intra_op_num_threads"] == result["threads"]["onnxruntime_intra_op"]
    assert row["agreement_with_ours"]["compared_tokens"] <= 6


# --- llama.cpp: skipped with a reason -----------------------------------------------------------------------

def test_llama_cpp_absent_is_skipped_with_the_install_hint(monkeypatch, gguf):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    peer, reason = llama_cpp_peer(gguf, 64, 2)
    assert peer is None
    assert reason.startswith("llama-cpp-python not installed") and "pip install -e '.[peers]'" in reason
    row = ar._peer_row("llama_cpp", LLAMA_NAME, None, reason, {}, {}, {})
    assert row == {"name": "llama.cpp", "status": "skipped", "reason": reason}
    table = ar.ar_decode_table({"new_tokens": 8, "repeats": 1, "ours_decode_tokens_per_second": 30.0, "peers": [row]})
    assert f"llama.cpp                    skipped: {reason}" in table


def test_llama_cpp_needs_a_gguf_target(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    peer, reason = llama_cpp_peer(ModelSource("hf", tmp_path), 64, 2, prompt_lookup_tokens=10)
    assert peer is None and "not a GGUF file" in reason
    assert peer_name(10) == "llama.cpp prompt lookup (10)" and peer_name() == "llama.cpp"


class _LlamaPeer(LlamaCppPeer):
    def __init__(self):  # nothing loaded: only what it says it runs
        pass

    def describe(self):
        return {"llama_cpp_python": "0.3.36", "quantization": "Q4_1", "n_ctx": 256, "n_threads": 2,
                "prompt_lookup": {"num_pred_tokens": 10, "max_ngram_size": 2}}


def test_ar_table_has_the_llama_cpp_row_next_to_genai():
    tps = {"ours": 20.0, "onnxruntime_genai": 100.0, "llama_cpp": 80.0}
    decode = {"ours": 25.0, "onnxruntime_genai": 120.0, "llama_cpp": 100.0}
    agreement = {"ours": peers.agreement([1, 2, 3], [1, 2, 3])}
    rows = [ar._peer_row("onnxruntime_genai", peers.GENAI_NAME, _Peer(), None, tps, decode, agreement),
            ar._peer_row("llama_cpp", LLAMA_NAME, _LlamaPeer(), None, tps, decode, agreement)]
    assert rows[1]["ours_decode_ratio"] == pytest.approx(25 / 100)
    table = ar.ar_decode_table({"new_tokens": 128, "repeats": 3, "ours_decode_tokens_per_second": 25.0,
                                "peers": rows}).splitlines()
    assert table[-2].split()[:3] == ["llama.cpp", "100.0", "ours"] and "0.25x" in table[-2]
    assert "greedy tokens identical of 3 compared" in table[-2]
    assert table[-1].strip() == ("ran: llama-cpp-python 0.3.36 (CPU), Q4_1 GGUF, n_ctx 256, 2 threads, prompt lookup "
                                 "10 tokens (n-gram <= 2)")


# --- llama.cpp: the real one on the target's GGUF, where llama-cpp-python is installed -------------------------

@pytest.fixture(scope="module")
def llama():
    """Plain and prompt-lookup llama.cpp on the smollm2 GGUF (1 thread: the machine is shared), and a chat prompt
    whose answer repeats it, so that prompt lookup finds drafts."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -e '.[peers]')")
    from dspark_trt.engine.prompts import chat_prompt_ids
    from dspark_trt.models.sources import load_tokenizer, resolve_model

    try:
        source = resolve_model("smollm2")
    except DSparkError as exc:
        pytest.skip(str(exc))
    prompt = chat_prompt_ids(load_tokenizer(source), "Repeat this sentence three times: the quick brown fox jumps "
                                                     "over the lazy dog.")
    n_ctx = len(prompt) + 64
    plain, _ = llama_cpp_peer(source, n_ctx, threads=1)
    lookup, _ = llama_cpp_peer(source, n_ctx, threads=1, prompt_lookup_tokens=10)
    return plain, lookup, prompt


def _eval_sizes(llm, monkeypatch) -> list[int]:
    """The number of tokens of every llama.cpp evaluation from now on."""
    sizes, real = [], llm.eval
    monkeypatch.setattr(llm, "eval", lambda tokens: (sizes.append(len(tokens)), real(tokens))[1])
    return sizes


def test_llama_cpp_generates_the_budget_and_prefills_every_request_whole(llama, monkeypatch):
    plain, _, prompt = llama
    sizes = _eval_sizes(plain.llm, monkeypatch)
    run = plain.generate(prompt, 12)
    assert len(run.output_ids) == 12 and 0 < run.first_token_seconds < run.seconds
    assert plain.generate(prompt, 12).output_ids == run.output_ids
    # the whole prompt, then one token per step (the last token is never evaluated), for both requests: the
    # second reused nothing of the first's KV cache
    assert sizes == 2 * ([len(prompt)] + [1] * 11)


def test_llama_cpp_stops_at_eos_or_the_budget(llama):
    plain, _, prompt = llama
    stop = (plain.llm.token_eos(),)
    ids = plain.generate(prompt, 48, stop).output_ids
    assert 0 < len(ids) <= 48 and (len(ids) == 48 or ids[-1] in stop)
    assert not any(t in stop for t in ids[:-1])


def test_llama_cpp_records_what_ran(llama):
    import llama_cpp

    plain, lookup, prompt = llama
    described = plain.describe()
    assert described["llama_cpp_python"] == llama_cpp.__version__
    assert (described["n_threads"], described["n_threads_batch"]) == (1, 1)
    assert described["quantization"] == "Q4_1" and described["n_ctx"] >= len(prompt) + 64
    assert described["prompt_lookup"] is None and "repeat_penalty 1.0" in described["sampling"]
    assert lookup.describe()["prompt_lookup"] == {"num_pred_tokens": 10, "max_ngram_size": 2}
    assert "Q4_1 GGUF" in plain.summary() and "1 threads" in plain.summary()
    with pytest.raises(DSparkError, match="exceed the"):
        plain.generate(prompt, 65)


def test_llama_cpp_prompt_lookup_is_greedy_and_equals_plain_decoding(llama, monkeypatch):
    import numpy as np

    plain, lookup, prompt = llama
    stop = (plain.llm.token_eos(),)
    sizes = _eval_sizes(lookup.llm, monkeypatch)
    spec = lookup.generate(prompt, 64, stop).output_ids
    assert any(size > 1 for size in sizes[1:])  # it did verify drafted tokens
    assert spec == plain.generate(prompt, 64, stop).output_ids and spec[-1] in stop
    # each token is the argmax of the logits it came from: no penalty or sampler bent the choice
    scores = lookup.llm.scores
    assert [int(np.argmax(scores[len(prompt) - 1 + i])) for i in range(len(spec))] == spec
    # through EOS to the end of the context it was made for, drafts and all. Only the answer is compared: the
    # logits of a batched verification differ from a one-token step's (by up to ~1 seen), which flipped a
    # near-tie (0.005 apart) among the tokens after EOS
    through = lookup.generate(prompt, 64).output_ids
    assert len(through) == 64 and through[:len(spec)] == spec


@pytest.mark.slow
def test_bench_ar_has_the_llama_cpp_row(llama):
    result = ar.bench_ar("smollm2", "What is 2+2?", 6, 1, genai=False)
    row = next(p for p in result["peers"] if p["name"] == LLAMA_NAME)
    assert row["status"] == "ran", row
    assert row["description"]["n_threads"] == result["threads"]["onnxruntime_intra_op"] == result["threads"]["torch"]
    assert result["ours_vs_llama_cpp"] == pytest.approx(result["ours_decode_tokens_per_second"]
                                                        / row["decode_tokens_per_second"])
    assert row["agreement_with_ours"]["compared_tokens"] <= 6
    assert result["peers"][0] == {"name": "onnxruntime-genai", "status": "skipped",
                                  "reason": "not requested (--no-genai)"}


# --- bench speedup: per domain ------------------------------------------------------------------------------

def test_prompt_domain_comes_from_the_eval_file_name():
    assert [prompt_domain(f"../shared/data/eval/{name}.jsonl") for name in
            ("gsm8k", "math500", "humaneval", "mbpp", "mt-bench", "mine")] == [
        "math", "math", "code", "code", "chat", "mine"]


LOOKUP = "llama.cpp prompt lookup (10)"


def _row(domain, identical, accepted, steps, ar_run, spec_run, llama_run, llama_same, lookup_run, lookup_same,
         lookup_plain):
    return {"domain": domain, "identical": identical, "accepted_tokens": accepted, "steps": steps,
            "runs": {AR: dict(zip(("tokens", "seconds"), ar_run)),
                     DSPARK: dict(zip(("tokens", "seconds"), spec_run)),
                     "llama.cpp": {"tokens": llama_run[0], "seconds": llama_run[1],
                                   "token_identical_to_ar": llama_same},
                     LOOKUP: {"tokens": lookup_run[0], "seconds": lookup_run[1], "token_identical_to_ar": lookup_same,
                              "token_identical_to_plain": lookup_plain}}}


ROWS = [_row("math", True, 6, 3, (10, 1.0), (10, 0.5), (10, 0.25), False, (10, 0.2), False, True),
        _row("code", False, 2, 2, (30, 1.0), (30, 2.0), (30, 0.75), True, (30, 0.5), True, False),
        _row("math", True, 10, 4, (20, 2.0), (20, 1.0), (20, 0.5), True, (20, 0.3), True, True)]


def test_summary_pools_tokens_and_seconds_per_domain():
    math = summarize([r for r in ROWS if r["domain"] == "math"])
    # tokens over seconds, not a mean of per-prompt rates (that would be 10 and 10 -> AR 10, DSpark 20)
    assert math["prompts"] == 2 and math["ar_tokens_per_second"] == pytest.approx(30 / 3.0)
    assert math["dspark_tokens_per_second"] == pytest.approx(30 / 1.5) and math["speedup"] == pytest.approx(2.0)
    assert math["mean_accepted_length"] == pytest.approx(16 / 7) and math["all_token_identical"]
    assert math["peers"] == [
        {"name": "llama.cpp", "status": "ran", "tokens_per_second": pytest.approx(40.0),
         "ratio_to_ar": pytest.approx(4.0), "token_identical_to_ar": False},
        {"name": LOOKUP, "status": "ran", "tokens_per_second": pytest.approx(60.0), "ratio_to_ar": pytest.approx(6.0),
         "token_identical_to_ar": False, "token_identical_to_plain": True}]
    code = summarize([ROWS[1]])
    assert (code["speedup"], code["mean_accepted_length"], code["all_token_identical"]) == (0.5, 1.0, False)
    assert code["peers"][1]["token_identical_to_plain"] is False and code["peers"][0]["token_identical_to_ar"]
    overall = summarize(ROWS)
    assert overall["ar_tokens_per_second"] == pytest.approx(60 / 4.0)  # the mean of the rates would be 16.7
    assert overall["mean_accepted_length"] == pytest.approx(18 / 9)
    assert [p["token_identical_to_ar"] for p in overall["peers"]] == [False, False]
    assert overall["peers"][1]["token_identical_to_plain"] is False


def test_speedup_table_lists_every_peer_what_it_ran_and_the_domains():
    overall = summarize(ROWS)
    overall["peers"][0].update(what_ran="llama-cpp-python 0.3.36 (CPU), Q4_1 GGUF, n_ctx 512, 2 threads")
    overall["peers"].append({"name": "onnxruntime-genai", "status": "skipped", "reason": "not installed"})
    result = {"schedule": "fixed", **overall,
              "per_domain": {"math": summarize([ROWS[0], ROWS[2]]), "code": summarize([ROWS[1]])}}
    lines = speedup_table(result).splitlines()
    assert lines[3].split() == ["llama.cpp", "40.0", "2.67", "False"]
    assert lines[4].endswith("60.0   4.00  False  (identical to its plain decoding: False)")
    assert lines[5].endswith("skipped: not installed")
    assert lines[6] == "  llama.cpp: llama-cpp-python 0.3.36 (CPU), Q4_1 GGUF, n_ctx 512, 2 threads"
    assert lines[7].startswith("ceiling: not computed (give --cost-table")
    header = lines[9].split()
    assert header[-6:] == ["all", "(3)", "math", "(2)", "code", "(1)"]
    assert lines[10].split()[-6:] == ["15.0", "(1.00x)", "10.0", "(1.00x)", "30.0", "(1.00x)"]
    assert lines[12].split() == ["tau", "2.00", "2.29", "1.00"]
    assert lines[13].split()[-6:] == ["40.0", "(2.67x)", "40.0", "(4.00x)", "40.0", "(1.33x)"]
    assert len(lines) == 15
    result["ceiling"] = {"perfect_drafter_speedup": 1.83, "perfect_drafter_verified_tokens": 7, "plain_step_ms": 10.0,
                         "draft_step_ms": 5.0, "predicted_speedup_at_measured_tau": 0.71}
    assert speedup_table(result).splitlines()[7] == (
        "ceiling on the cost table: a drafter whose every draft is accepted 1.83x (verifying 7 tokens; plain step "
        "10.0 ms, draft step 5.0 ms); predicted at the measured tau 0.71x")


def test_bench_speedup_end_to_end_per_domain(pair, tmp_path, monkeypatch, capsys):
    """The tiny pair, two prompts files named like the eval sets: rows per domain add up to the whole; the
    llama.cpp rows are skipped (the tiny target is no GGUF), the genai row too (stubbed)."""
    from dspark_trt.cli import main as cli_main

    monkeypatch.setattr(peers, "genai_peer", lambda *a, **k: (None, "stubbed in this test"))
    lines = (pair / "prompts.jsonl").read_text().splitlines()
    (tmp_path / "gsm8k.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "mt-bench.jsonl").write_text("\n".join(lines[2:5]) + "\n")
    out = tmp_path / "speedup.json"
    table = CostTable([1, 4, 16], [100.0, 60.0, 20.0], draft_requests=[1], draft_seconds=[0.004])
    table.to_json(tmp_path / "cost.json")
    assert cli_main(["bench", "speedup", "--target", str(pair / "target"), "--draft", str(pair / "draft"),
                     "--prompts-file", str(tmp_path / "gsm8k.jsonl"),
                     "--prompts-file", str(tmp_path / "mt-bench.jsonl"),
                     "--max-tokens", "8", "--cost-table", str(tmp_path / "cost.json"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    block = json.loads((pair / "draft" / "config.json").read_text())["block_size"]
    verified, best = table.perfect_drafter_ceiling(block)
    assert result["ceiling"]["perfect_drafter_speedup"] == pytest.approx(best)
    assert result["ceiling"]["perfect_drafter_verified_tokens"] == verified
    assert result["ceiling"]["predicted_speedup_at_measured_tau"] == pytest.approx(
        table.speculation_speedup(block + 1, result["mean_accepted_length"]))
    assert [r["domain"] for r in result["per_prompt"]] == ["math", "math", "chat", "chat", "chat"]
    assert {d: s["prompts"] for d, s in result["per_domain"].items()} == {"math": 2, "chat": 3}
    for row in result["per_prompt"]:
        runs = row["runs"]
        assert runs[AR]["tokens"] == row["tokens"] and all(0 < run["tokens"] <= 8 for run in runs.values())
        assert runs["transformers prompt lookup (10)"]["token_identical_to_plain"]
        # the fixed schedule drafts every step; what it verified and accepted is counted from the drafts
        assert row["drafted_steps"] == row["steps"] and 0 <= row["drafts_accepted"] <= row["drafts_verified"]
        assert row["drafts_verified"] <= block * row["steps"]
    ar_tokens = sum(r["runs"][AR]["tokens"] for r in result["per_prompt"])
    ar_seconds = sum(r["runs"][AR]["seconds"] for r in result["per_prompt"])
    assert result["ar_tokens_per_second"] == pytest.approx(ar_tokens / ar_seconds)
    status = {p["name"]: p["status"] for p in result["peers"]}
    assert status == {"transformers generate": "ran", "transformers prompt lookup (10)": "ran",
                      "onnxruntime-genai": "skipped", "llama.cpp": "skipped", LOOKUP: "skipped"}
    assert all(p["reason"] for p in result["peers"] if p["status"] == "skipped")
    assert "transformers generate: transformers" in capsys.readouterr().out
