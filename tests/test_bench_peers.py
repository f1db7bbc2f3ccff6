"""The onnxruntime-genai peer of `bench ar`: skipped with a reason where it is not installed, built once
and cached by the weights' sha256, its build failures explained, its row and agreement measured right.
Nothing here builds the real genai model; the tests on the real one are `slow` and skip unless it is cached."""
import hashlib
import json
import sys
import types

import pytest

from dspark_trt.bench import ar, peers
from dspark_trt.errors import DSparkError
from dspark_trt.models.sources import ModelSource, cache_dir

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
    with pytest.raises(peers.GenaiUnavailable) as exc:
        peers.import_genai()
    assert "onnxruntime-genai not installed" in exc.value.reason
    assert "pip install -e '.[peers]'" in exc.value.reason
    peer, reason = ar.genai_peer(gguf, None, None, None, 2, lambda msg: None)
    assert peer is None and reason == exc.value.reason
    assert not private_cache.exists()  # nothing was built on the way
    row = ar._genai_row(None, reason, {}, {}, {})
    assert row == {"name": "onnxruntime-genai", "status": "skipped", "reason": reason}
    table = ar.ar_decode_table({"new_tokens": 8, "repeats": 1, "ours_decode_tokens_per_second": 30.0,
                                "transformers_decode_tokens_per_second": 20.0, "peers": [row]})
    assert f"onnxruntime-genai            skipped: {reason}" in table


def test_absent_package_skips_even_with_a_named_model(no_genai, gguf, tmp_path):
    peer, reason = ar.genai_peer(gguf, None, None, str(tmp_path), 2, lambda msg: None)
    assert peer is None and "not installed" in reason


def test_builder_needs_onnx_ir(fake_genai, monkeypatch, gguf, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx_ir", None)
    with pytest.raises(peers.GenaiUnavailable, match="onnx_ir not installed.*model builder needs it"):
        peers.prepare_genai_model(gguf, root=tmp_path / "peers")
    peer, reason = ar.genai_peer(gguf, None, None, None, 2, lambda msg: None)
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
    peer, reason = ar.genai_peer(gguf, None, None, None, 2, lambda msg: None)
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


class _Peer:
    def describe(self):
        return {"onnxruntime_genai": "0.18.0", "precision": "int4", "block_size": 32, "accuracy_level": 4,
                "intra_op_num_threads": 2}


def test_ran_row_ratio_is_ours_over_the_peer_and_names_what_ran():
    tps = {"ours": 20.0, "onnxruntime": 60.0, "onnxruntime_genai": 100.0}
    decode = {"ours": 25.0, "onnxruntime": 150.0, "onnxruntime_genai": 120.0}
    agreement = {"ours": peers.agreement([1, 2, 3], [1, 2, 4]), "onnxruntime": peers.agreement([1, 2, 3], [1, 2, 4])}
    row = ar._genai_row(_Peer(), None, tps, decode, agreement)
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
    row = ar._genai_row(_Peer(), None, tps, decode, {"ours": agreement["ours"]})
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
    assert seen == {"genai": False, "genai_model": None, "genai_accuracy_level": None}


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
