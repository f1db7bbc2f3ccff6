"""Losslessness on the engines that ship by default: `build-engines --draft default` for SmolLM2 (the fused
ONNX Runtime graph, int4 weights from the GGUF's blocks, the shipped drafter). Greedy speculation equals
greedy plain decoding on them, token for token, alone and in a batch, and plain decoding alone equals plain
decoding in a batch; at T > 0 speculative samples follow
the engine's own next-token distribution (chi-square against its exact enumeration)."""
import pytest
import torch

from conftest import chi_square_p_value
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.runtimes.ort_runtime import OrtRuntime
from dspark_trt.spec.sampling import warp_probs
from dspark_trt.spec.scheduler import make_scheduler

pytestmark = pytest.mark.slow

PROMPTS = ("Name three colors and one thing of each color.", "What is 12 times 13? Show the steps.",
           "Write a Python function that reverses a string.", "Give me two tips for sleeping better.")


@pytest.fixture(scope="module")
def default_engines(tmp_path_factory):
    from dspark_trt.build.pipeline import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("default_engines")
    manifest = build_engines(BuildOptions(out=str(out), draft="default"), progress=lambda message: None)
    assert manifest["target"]["graph"] == "fused" and manifest["target"]["weights"] == "int4"
    assert manifest["target"]["accuracy_level"] == 4 and manifest["draft"]["weights"] == "int8"
    return out


@pytest.fixture(scope="module")
def runtime(default_engines):
    """One runtime of the pair for the whole module (loading the sessions takes seconds): every request here
    frees its slot, and a pass carries only its live requests' rows, so a request alone still runs M = 1."""
    return OrtRuntime(default_engines, num_slots=16, max_seq_len=512)


def _generate(runtime, prompts, params, speculate: bool):
    scheduler = make_scheduler("fixed", runtime.block_size) if speculate else None
    return Engine(runtime, scheduler).generate(prompts, params)


def test_greedy_speculation_equals_plain_decoding_on_the_default_engines(default_engines, runtime):
    from dspark_trt.graphs.manifest import load_engine_tokenizer

    tokenizer = load_engine_tokenizer(default_engines)
    prompts = [chat_prompt_ids(tokenizer, text) for text in PROMPTS]
    params = SamplingParams(max_tokens=48)
    plain = [r.output_ids for r in _generate(runtime, prompts, params, speculate=False)]
    together = _generate(runtime, prompts, params, speculate=True)  # four requests share each pass
    assert [r.output_ids for r in together] == plain
    assert sum(r.stats.draft_tokens_accepted for r in together) > 0
    alone = [_generate(runtime, [p], params, speculate=True)[0].output_ids for p in prompts[:2]]
    assert alone == plain[:2]
    # a lone request decodes one token per pass: every matmul's M = 1 case (a different kernel on AVX2 CPUs)
    plain_alone = [_generate(runtime, [p], params, speculate=False)[0].output_ids for p in prompts[:2]]
    assert plain_alone == plain[:2]


def _exact_distribution(runtime, prompt, n_tokens, params):
    """P(x_1..x_n | prompt) of the engine's target for every continuation with non-zero probability."""

    def next_probs(seq):
        slot = runtime.allocate_slot()
        try:
            step = runtime.target_forward(torch.tensor(seq), torch.tensor([slot]), torch.tensor([len(seq)]), "last")
        finally:
            runtime.free_slot(slot)
        return warp_probs(step.logits, params.temperature, params.top_k, params.top_p)[0]

    probs = {(): 1.0}
    for _ in range(n_tokens):
        grown = {}
        for tokens, p in probs.items():
            q = next_probs(prompt + list(tokens))
            for token in torch.nonzero(q).flatten().tolist():
                grown[tokens + (token,)] = p * float(q[token])
        probs = grown
    return probs


def test_sampling_follows_the_default_engine_distribution(default_engines, runtime):
    from dspark_trt.graphs.manifest import load_engine_tokenizer

    tokenizer = load_engine_tokenizer(default_engines)
    # a 7-token story opening, no chat template: the 700 prefills are most of the test's time on 2 cores (with
    # a 20-token chat turn it took 143 s, with this 80 s); its next tokens are diverse, and some drafts hit
    prompt = tokenizer.encode("Once upon a time, a cat", add_special_tokens=False)
    params = SamplingParams(max_tokens=4, temperature=1.0, top_k=3)
    exact = _exact_distribution(runtime, prompt, 4, params)
    engine = Engine(runtime, make_scheduler("fixed", runtime.block_size))
    engine.max_queue_size = 700
    requests = [engine.add_request(prompt, SamplingParams(**{**params.__dict__, "seed": seed})) for seed in range(700)]
    engine.run()
    outputs = [tuple(r.output_ids[:4]) for r in requests]
    keys = sorted(exact)
    assert len(keys) > 10  # a real distribution, not a near-certain continuation
    assert set(outputs) <= set(keys)  # nothing outside the engine's own top-3 support
    assert chi_square_p_value([outputs.count(k) for k in keys], [exact[k] for k in keys]) > 1e-3
    accepted = sum(r.stats.draft_tokens_accepted for r in requests)
    verified = sum(r.stats.draft_tokens_verified for r in requests)
    assert 30 <= accepted < 0.95 * verified  # drafts were both accepted and rejected


def test_eval_on_the_engines_counts_the_rounds_of_an_independent_run(default_engines, runtime, tmp_path):
    """`dspark-trt eval --engines`: the pair as served (its drafter and calibration from the directory); τ and
    its counts equal those of the same prompts decoded here on the same engines (greedy, fixed γ = block)."""
    import json

    from dspark_trt.cli import main
    from dspark_trt.graphs.manifest import load_engine_tokenizer, read_manifest

    dataset = tmp_path / "two.jsonl"
    dataset.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "eval.json"
    assert main(["eval", "--engines", str(default_engines), "--datasets", str(dataset), "--max-new-tokens", "24",
                 "--concurrency", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    engine = Engine(runtime, make_scheduler("fixed", runtime.block_size, has_confidence=True), record_rounds=True)
    tokenizer = load_engine_tokenizer(default_engines)
    own = engine.generate([chat_prompt_ids(tokenizer, p) for p in PROMPTS[:2]],
                          SamplingParams(max_tokens=24, stop_ids=tuple(runtime.eos_token_ids)))
    rounds = sum(len(r.stats.round_verified) for r in own)
    ds = report["datasets"]["two"]
    assert ds["rounds"] == rounds and ds["generated_tokens"] == sum(len(r.output_ids) for r in own)
    assert ds["tau"] == pytest.approx(sum(len(r.output_ids) - 1 for r in own) / rounds)
    manifest = read_manifest(default_engines)
    assert report["machine"]["runtime"] == "onnxruntime" and report["draft"]["weights"] == "int8"
    assert report["draft"]["graph_sha256"]["draft"] == manifest["graphs"]["draft"]["sha256"]
    assert report["calibration"] is not None  # build-engines copied the shipped drafter's
    with pytest.raises(SystemExit) as refused:  # one pair or the other
        main(["eval", "--engines", str(default_engines), "--draft", "default", "--datasets", str(dataset)])
    assert refused.value.code == 2
