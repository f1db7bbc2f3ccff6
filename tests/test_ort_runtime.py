"""The engine on ONNX Runtime gives the same greedy tokens (and accepted lengths) as on torch."""
import json

import pytest

from conftest import tiny_drafter, tiny_target
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.request import SamplingParams
from dspark_trt.errors import DSparkError
from dspark_trt.export.engines import export_engines
from dspark_trt.runtimes.ort_runtime import OrtRuntime
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.scheduler import make_scheduler

PROMPTS = [[3, 1, 2, 1, 0, 2, 3], [2, 1], [1, 3, 2, 0, 2, 3, 3, 1, 0, 0, 2]]


def _run(runtime, prompts, params, speculate=True):
    scheduler = make_scheduler("fixed", runtime.block_size) if speculate else None
    return Engine(runtime, scheduler).generate(prompts, params)


def test_tiny_pair_greedy_identical_with_speculation(tmp_path):
    target = tiny_target(vocab_size=6, seed=2, scale=3.0)  # a seed whose drafts get accepted
    drafter = tiny_drafter(target, block_size=4, seed=2)
    export_engines(target, drafter, tmp_path)
    params = SamplingParams(max_tokens=20)
    ref = _run(TorchRuntime(target, drafter, num_slots=4, max_seq_len=64), PROMPTS, params)
    ort = _run(OrtRuntime(tmp_path, num_slots=4, max_seq_len=64), PROMPTS, params)
    assert [r.output_ids for r in ort] == [r.output_ids for r in ref]
    assert [r.stats.accepted_lengths for r in ort] == [r.stats.accepted_lengths for r in ref]
    assert sum(r.stats.draft_tokens_accepted for r in ort) > 0  # drafts were really accepted
    ar = _run(OrtRuntime(tmp_path, num_slots=4, max_seq_len=64, use_drafter=False), PROMPTS, params, False)
    assert [r.output_ids for r in ar] == [r.output_ids for r in ref]


def test_sampled_decoding_verifies_in_graph_and_equals_torch(tmp_path, monkeypatch):
    """At T>0 the engine's verification runs in the target graph's DSparkVerify node; with the same
    seeds it draws the same tokens and accepts the same prefixes as the torch runtime."""
    target = tiny_target(vocab_size=6, seed=2, scale=3.0)
    drafter = tiny_drafter(target, block_size=4, seed=2)
    export_engines(target, drafter, tmp_path)
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=11)
    ref = _run(TorchRuntime(target, drafter, num_slots=4, max_seq_len=64), PROMPTS, params)
    runtime = OrtRuntime(tmp_path, num_slots=4, max_seq_len=64)
    assert runtime.verify_in_graph

    def no_host_verification(*args, **kwargs):
        raise AssertionError("verified on the host, not in the graph")

    monkeypatch.setattr("dspark_trt.runtimes.base.dspark_verify", no_host_verification)
    ort = _run(runtime, PROMPTS, params)
    assert all(r.error is None for r in ort)
    assert [r.output_ids for r in ort] == [r.output_ids for r in ref]
    assert [r.stats.round_accepted for r in ort] == [r.stats.round_accepted for r in ref]
    assert sum(r.stats.draft_tokens_accepted for r in ort) > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logit_controls_and_log_probs_give_the_torch_runtimes_tokens(tmp_path, temperature):
    """A pass with controls (or log-probs) skips the graph's DSparkVerify node and verifies on the host, on the
    logits controlled by the same spec.controls: the torch runtime's tokens and log-probs."""
    target = tiny_target(vocab_size=6, seed=2, scale=3.0)
    drafter = tiny_drafter(target, block_size=4, seed=2)
    export_engines(target, drafter, tmp_path)
    plain = SamplingParams(max_tokens=20, temperature=temperature, seed=3, stop_ids=(5,))
    params = SamplingParams(**{**plain.__dict__, "repetition_penalty": 1.3, "frequency_penalty": 0.4,
                               "min_tokens": 6, "bad_words": ((2, 0),), "return_log_probs": True})
    torch_runtime = TorchRuntime(target, drafter, num_slots=4, max_seq_len=64)
    ref = _run(torch_runtime, PROMPTS, params)
    ort = _run(OrtRuntime(tmp_path, num_slots=4, max_seq_len=64), PROMPTS, params)
    assert [r.output_ids for r in ort] == [r.output_ids for r in ref]
    assert [r.output_ids for r in ort] != [r.output_ids for r in _run(torch_runtime, PROMPTS, plain)]
    for a, b in zip(ort, ref):
        assert len(a.output_logprobs) == len(a.output_ids)
        assert a.output_logprobs == pytest.approx(b.output_logprobs, abs=1e-4)
    assert sum(r.stats.draft_tokens_accepted for r in ort) > 0


def test_a_gated_engine_extends_the_drafter_context_as_torch_does(tmp_path):
    """A draft gate that finds drafting never pays skips most steps and probes one request at a time: on ONNX
    Runtime the skipped steps' features reach the drafter through the `context` graph, one call a step for the
    requests whose backlog reached a block's rows, and each probe drafts what the torch reference drafts (the
    same accepted drafts every round), greedy = plain."""
    from dspark_trt.spec.cost_table import CostTable

    target = tiny_target(vocab_size=6, seed=2, scale=3.0)
    drafter = tiny_drafter(target, block_size=4, seed=2)
    export_engines(target, drafter, tmp_path)
    table = CostTable([1, 8], [10.0, 10.0], draft_requests=[1, 8], draft_seconds=[10.0, 10.0])
    params = SamplingParams(max_tokens=30)

    def gated(runtime):
        scheduler = make_scheduler("dspark", 4, cost_table=table, min_predicted_gain=0.0)
        scheduler.gate.smoothing = 0.0  # no learning of step times: both engines take the same decisions
        return Engine(runtime, scheduler, context_backlog=4 + 1)  # a block's rows: extensions come often

    ref = gated(TorchRuntime(target, drafter, num_slots=4, max_seq_len=64)).generate(PROMPTS, params)
    runtime = OrtRuntime(tmp_path, num_slots=4, max_seq_len=64)
    extensions = []
    extend = runtime.drafter.extend_context
    runtime.drafter.extend_context = lambda slots, features: extensions.append(len(slots)) or extend(slots, features)
    ort = gated(runtime).generate(PROMPTS, params)
    plain = _run(OrtRuntime(tmp_path, num_slots=4, max_seq_len=64, use_drafter=False), PROMPTS, params, False)
    assert [r.output_ids for r in ort] == [r.output_ids for r in ref] == [r.output_ids for r in plain]
    assert [r.stats.round_accepted for r in ort] == [r.stats.round_accepted for r in ref]
    assert sum(r.stats.draft_tokens_accepted for r in ort) > 0  # probes resumed drafting and were accepted
    assert len(extensions) > 5 and max(extensions) >= 2  # backlogs of skipped steps, requests batched in a call


def test_slots_are_recycled_and_rolled_back(tmp_path):
    """More requests than slots: a freed slot's stale K/V and context must never leak into the next."""
    target = tiny_target(vocab_size=4, seed=5, scale=3.0)
    drafter = tiny_drafter(target, block_size=3, seed=5)
    export_engines(target, drafter, tmp_path)
    prompts = PROMPTS * 2
    params = SamplingParams(max_tokens=12)
    ref = _run(TorchRuntime(target, drafter, num_slots=2, max_seq_len=64), prompts, params)
    runtime = OrtRuntime(tmp_path, num_slots=2, max_seq_len=64)
    ort = _run(runtime, prompts, params)
    assert [r.output_ids for r in ort] == [r.output_ids for r in ref]
    assert runtime.free_slots == 2


def test_bad_engine_dirs_are_named(tmp_path):
    with pytest.raises(DSparkError, match="no manifest.json"):
        OrtRuntime(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "dspark-trt-engines/1", "graphs": {
        "target": {"file": "target.onnx"}}}))
    with pytest.raises(DSparkError, match="graph 'target' file target.onnx is missing"):
        OrtRuntime(tmp_path)


def test_engines_of_an_older_dspark_trt_ask_to_be_rebuilt(tmp_path):
    """A manifest without the `context` graph (engines built before it existed) fails the drafter's load with
    the fix; the target alone still runs, and a cache of builds sees it is not current."""
    from dspark_trt.graphs.manifest import is_current_build, read_manifest, write_manifest

    target = tiny_target(vocab_size=6, seed=2)
    export_engines(target, tiny_drafter(target, block_size=4, seed=2), tmp_path)
    assert is_current_build(tmp_path)
    manifest = read_manifest(tmp_path)
    del manifest["graphs"]["context"]
    write_manifest(tmp_path, manifest)
    assert not is_current_build(tmp_path)
    with pytest.raises(DSparkError, match=r"no drafter graph \['context'\] \(engines built by an older dspark-trt: "
                                          r"rebuild them with `dspark-trt build-engines`\)"):
        OrtRuntime(tmp_path)
    assert OrtRuntime(tmp_path, use_drafter=False).block_size == 0


@pytest.mark.slow
def test_smollm2_default_pair_greedy_identical(smollm2, smollm2_portable_engines):
    from dspark_trt.engine.prompts import chat_prompt_ids

    model, tokenizer = smollm2
    engines, drafter = smollm2_portable_engines
    prompts = [chat_prompt_ids(tokenizer, t) for t in ("Name three colors.", "What is 12 times 12?")]
    params = SamplingParams(max_tokens=16, stop_ids=tuple(model.config.eos_token_ids))
    ref = _run(TorchRuntime(model, drafter, num_slots=2, max_seq_len=256), prompts, params)
    ort = _run(OrtRuntime(engines, num_slots=2, max_seq_len=256), prompts, params)
    assert [r.output_ids for r in ort] == [r.output_ids for r in ref]


def test_profile_measures_the_onnx_runtime_engines_with_a_row_per_request_count(smollm2, tmp_path, capsys):
    from dspark_trt.cli import main

    target = tiny_target(vocab_size=6, seed=2)
    export_engines(target, tiny_drafter(target, block_size=2, seed=2), tmp_path / "engines")
    smollm2[1].save_pretrained(tmp_path / "engines" / "tokenizer")  # profile builds the engine like serving does
    out = tmp_path / "cost.json"
    assert main(["profile", "--engines", str(tmp_path / "engines"), "--out", str(out), "--batch-sizes", "1,2,6",
                 "--repeats", "1", "--context-len", "8", "--json"]) == 0
    table = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == table
    assert table["metadata"]["runtime"] == OrtRuntime.name and table["batch_sizes"] == [1, 2, 6]
    # rows for R = 1, 2, 6 requests carrying 1..3 tokens each (block 2), capped at the largest B
    assert {row["requests"]: row["batch_sizes"] for row in table["by_requests"]} == {
        1: [1, 2, 3], 2: [2, 4, 6], 6: [6]}
    assert len(table["draft_seconds"]) == 3
