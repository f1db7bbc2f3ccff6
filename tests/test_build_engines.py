"""build-engines end to end on the tiny Qwen3 pair: graphs, checks, validation, manifest, errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from transformers import AutoTokenizer

from dspark_trt.build.pipeline import BuildOptions, build_engines
from dspark_trt.build.validate import failures
from dspark_trt.errors import DSparkError
from dspark_trt.export.tensorrt_build import TENSORRT_MISSING
from dspark_trt.graphs.manifest import load_engine_tokenizer, sha256

from test_cli_spec import pair  # noqa: F401  (the tiny Qwen3 target + tokenizer + drafter fixture)

ROOT = Path(__file__).resolve().parents[1]


def _script(*args):
    return subprocess.run([sys.executable, str(ROOT / "build" / "build_engines.py"), *args], capture_output=True,
                          text=True)


CALIBRATED_TEMPERATURES = [0.5, 1.0, 1.5, 2.0]  # one per block position of the pair's drafter (block 4)


@pytest.fixture(scope="module")
def built(pair, tmp_path_factory):  # noqa: F811
    """Engines of the pair, built from a copy of its drafter that has a stored STS calibration."""
    from dspark_trt.spec.calibration import Calibration, save_calibration

    out, draft = tmp_path_factory.mktemp("engines"), tmp_path_factory.mktemp("calibrated") / "draft"
    shutil.copytree(pair / "draft", draft)
    save_calibration(Calibration(temperatures=CALIBRATED_TEMPERATURES), draft / "calibration.json")
    result = _script("--target", str(pair / "target"), "--draft", str(draft), "--out", str(out),
                     "--max-seq-len", "256", "--max-batch-tokens", "64", "--draft-weights", "fp32")
    assert result.returncode == 0, result.stderr
    return out, result.stderr


def test_manifest_describes_every_graph(built, pair):  # noqa: F811
    out, stderr = built
    manifest = json.loads((out / "manifest.json").read_text())
    draft_cfg = json.loads((pair / "draft" / "config.json").read_text())
    assert set(manifest["graphs"]) == {"target", "draft", "context"}
    for name, graph in manifest["graphs"].items():
        path = out / graph["file"]
        assert graph["sha256"] == sha256(path)
        model = onnx.load(str(path))
        assert [i["name"] for i in graph["inputs"]] == [i.name for i in model.graph.input]
        assert [o["name"] for o in graph["outputs"]] == [o.name for o in model.graph.output]
    target = manifest["graphs"]["target"]
    assert target["outputs"][0] == {"name": "logits", "shape": ["rows", 12], "dtype": "float32"}
    assert {"name": "input_ids", "shape": ["tokens"], "dtype": "int64"} in target["inputs"]
    assert target["outputs"][-2:] == [{"name": n, "shape": ["verify_requests"], "dtype": "int64"}
                                      for n in ("accepted", "next_token")]
    assert {"name": "draft_probs", "shape": ["drafts", 12], "dtype": "float32"} in target["inputs"]
    assert manifest["verify"]["graph"] == "target" and manifest["verify"]["op"] == "ai.onnx.contrib::DSparkVerify"
    node = [n for n in onnx.load(str(out / target["file"])).graph.node if n.op_type == "DSparkVerify"]
    assert [n.name for n in node] == [manifest["verify"]["node"]] and node[0].input[0] == "verify_logits"
    assert manifest["taps"] == draft_cfg["target_layer_ids"]
    assert manifest["draft"]["block_size"] == draft_cfg["block_size"] == 4
    assert manifest["draft"]["mask_token_id"] == draft_cfg["mask_token_id"]
    assert (manifest["max_seq_len"], manifest["max_batch_tokens"]) == (256, 64)
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "onnxruntime_extensions",
                                          "dspark_trt", "opset"}
    results = manifest["validation"]["results"]
    assert results["draft_tokens_identical"] is True and results["target:logits"]["greedy_identical"] is True
    assert {"context:new_k", "context:new_v", "draft:new_k", "draft:new_v"} <= set(results)
    assert results["verify_identical"] is True
    assert all(r["max_abs_error"] < 1e-4 * max(1, r["scale"]) for r in results.values() if isinstance(r, dict))
    files = {Path(f["file"]).name: f["sha256"] for f in manifest["tokenizer"]["files"]}
    assert "tokenizer.json" in files and files["tokenizer.json"] == sha256(out / "tokenizer" / "tokenizer.json")
    for step in ("load", "export", "check", "validate", "tokenizer", "manifest"):
        assert f"] {step}" in stderr
    assert "target:logits: max abs error" in stderr


def test_engine_directory_runs_and_its_tokenizer_loads(built, pair):  # noqa: F811
    from dspark_trt.engine.engine import Engine
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.models.drafter_checkpoint import load_drafter
    from dspark_trt.models.weights import load_target
    from dspark_trt.runtimes.ort_runtime import OrtRuntime
    from dspark_trt.runtimes.torch_runtime import TorchRuntime
    from dspark_trt.spec.scheduler import make_scheduler

    out, _ = built
    tokenizer = load_engine_tokenizer(out)
    prompt = tokenizer("w5 w6 w7 w8")["input_ids"]
    assert prompt == [5, 6, 7, 8]
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(pair / "target").chat_template
    target, _ = load_target(str(pair / "target"))
    drafter = load_drafter(pair / "draft")
    params = SamplingParams(max_tokens=16)
    runtime = OrtRuntime(out, num_slots=2, max_seq_len=4096)
    assert runtime.max_seq_len == 256  # the built limit
    ours = Engine(runtime, make_scheduler("fixed", 4)).generate([prompt], params)
    ref = Engine(TorchRuntime(target, drafter, num_slots=2), make_scheduler("fixed", 4)).generate([prompt], params)
    assert ours[0].output_ids == ref[0].output_ids


def test_tensorrt_backend_fails_clearly(pair, tmp_path):  # noqa: F811
    result = _script("--target", str(pair / "target"), "--out", str(tmp_path), "--backend", "tensorrt")
    assert result.returncode == 2
    assert TENSORRT_MISSING in result.stderr
    assert not any(tmp_path.iterdir())  # failed before doing any work


def test_mismatched_drafter_names_the_load_step(pair, tmp_path):  # noqa: F811
    with pytest.raises(DSparkError, match="step 'load', graph 'draft': drafter does not match the target"):
        build_engines(BuildOptions(out=str(tmp_path), target="smollm2", draft=str(pair / "draft")),
                      progress=lambda m: None)


def test_validation_failure_names_the_graph(pair, tmp_path, monkeypatch):  # noqa: F811
    import dspark_trt.build.pipeline as build_module

    bad = {"target:logits": {"max_abs_error": 1e-6, "scale": 3.0, "greedy_identical": True},
           "draft:probs": {"max_abs_error": 0.5, "scale": 2.0}}
    monkeypatch.setattr(build_module, "validate_engines", lambda *a, **k: bad)
    with pytest.raises(DSparkError, match="step 'validate'.*graph 'draft', output 'probs': max abs error 0.5"):
        build_engines(BuildOptions(out=str(tmp_path), target=str(pair / "target")), progress=lambda m: None)


def test_failures_apply_the_relative_tolerance():
    report = {"target:logits": {"max_abs_error": 2e-3, "scale": 10.0, "greedy_identical": True},
              "draft:confidence_logits": {"max_abs_error": 2e-3, "scale": 0.5},
              "target:taps": {"max_abs_error": 0.0, "scale": 1.0, "greedy_identical": False},
              "draft_tokens_identical": False, "verify_identical": False}
    problems = failures(report, tolerance=1e-3)
    assert len(problems) == 4
    quantized = {"target:logits": {"max_abs_error": 5.0, "scale": 35.0, "quantized": True, "mean_kl": 0.3,
                                   "top1_agreement": 0.7},
                 "target:taps": {"max_abs_error": 200.0, "scale": 2e4, "quantized": True},
                 "draft_token_agreement": 0.2, "verify_identical": True}
    assert [p.split(":")[0] for p in failures(quantized, tolerance=1e-3)] == ["graph 'target', output 'logits'",
                                                                             "graph 'draft'"]
    quantized.update({"target:logits": {**quantized["target:logits"], "mean_kl": 0.04}, "draft_token_agreement": 0.9})
    assert failures(quantized, tolerance=1e-3) == []
    assert "graph 'draft', output 'confidence_logits'" in problems[0] and "greedy tokens differ" in problems[1]
    assert "drafted tokens differ" in problems[2] and "node 'dspark_verify'" in problems[3]


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(DSparkError, match="--max-seq-len must be at least 16"):
        build_engines(BuildOptions(out=str(tmp_path), max_seq_len=4))
    with pytest.raises(DSparkError, match="unknown backend 'tvm'"):
        build_engines(BuildOptions(out=str(tmp_path), backend="tvm"))
    with pytest.raises(DSparkError, match="unknown LM head 'int2': choose from gguf, fp32"):
        build_engines(BuildOptions(out=str(tmp_path), lm_head="int2"))


def test_generate_on_engines_equals_generate_on_torch(built, pair, capsys):  # noqa: F811
    from dspark_trt.cli import main

    out, _ = built
    common = ["--prompts-file", str(pair / "prompts.jsonl"), "--limit", "3", "--max-tokens", "10", "--json"]

    def generate(*args):  # in this process: a subprocess spent seconds importing
        assert main(["generate", *args, *common]) == 0
        return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]

    torch_ids = generate("--target", str(pair / "target"), "--draft", str(pair / "draft"), "--schedule", "fixed")
    assert generate("--engines", str(out), "--schedule", "fixed") == torch_ids
    assert generate("--engines", str(out), "--no-spec") == torch_ids


def test_the_drafters_calibration_travels_with_its_engines(built, tmp_path, monkeypatch):
    """generate --engines and package read the drafter's STS calibration from the engines (build-engines copies
    it in), and package fills the schedule and cost table as serve does: dspark with the cost table cached
    for these engines on this machine."""
    from dspark_trt.engine.factory import EngineOptions, build_engine
    from dspark_trt.serving.package import PackageOptions, package_repository

    out, _ = built
    entry = json.loads((out / "manifest.json").read_text())["calibration"]
    assert entry == {"file": "calibration.json", "sha256": sha256(out / "calibration.json")}
    engine, _ = build_engine(EngineOptions(engines=str(out), schedule="fixed", max_seq_len=256))
    assert engine.sts_temperatures.tolist() == CALIBRATED_TEMPERATURES
    monkeypatch.setenv("DSPARK_TRT_CACHE", str(tmp_path / "cache"))
    said = []
    repo = package_repository(PackageOptions(engines=str(out), out=str(tmp_path / "repo")), log=said.append)
    bls = (repo / "dspark_bls" / "config.pbtxt").read_text()
    tables = list((tmp_path / "cache" / "cost-tables").glob("*.json"))
    assert len(tables) == 1 and 'key: "schedule" value { string_value: "dspark" }' in bls
    assert f'key: "cost_table" value {{ string_value: "{tables[0]}" }}' in bls
    assert f'key: "calibration" value {{ string_value: "{out / "calibration.json"}" }}' in bls
    assert any("schedule dspark with the draft gate" in line and "calibration" in line for line in said)
