"""The torch paths on an accelerator: a training step and a speculative decode give the CPU's results.

These run where torch sees a CUDA device (a GPU host, or a lent one: scripts/gpu_check.py is the rest of that
check); on our CPU machines only the error for a missing device runs."""
import pytest
import torch

from dspark_trt.devices import resolve_device
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.request import SamplingParams
from dspark_trt.errors import DSparkError
from dspark_trt.runtimes.torch_runtime import TorchRuntime
from dspark_trt.spec.scheduler import make_scheduler
from dspark_trt.training.data import FeatureExtractor, Sample
from dspark_trt.training.trainer import Trainer, TrainConfig

from conftest import tiny_drafter, tiny_target

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on our CPU machines)")


def _samples():
    g = torch.Generator().manual_seed(3)
    return [Sample(torch.randint(0, 15, (n,), generator=g), torch.arange(n) >= 4) for n in (30, 22, 41, 17)]


def _train(device: str, tmp_path, steps: int = 3) -> tuple[list[float], dict]:
    target = tiny_target(vocab_size=16, seed=1, num_layers=3).to(device)
    drafter = tiny_drafter(target, block_size=4, seed=2).to(device)
    extractor = FeatureExtractor(target, [0, 1], max_batch=2, max_length=64)
    trainer = Trainer(drafter, extractor, _samples(), TrainConfig(steps=steps, batch_size=2, num_anchors=8,
                                                                  checkpoint_every=steps, log_every=steps),
                      tmp_path / device.replace(":", "_"))
    records = trainer.train(progress=False)
    return [r["loss"] for r in records], {k: v.cpu() for k, v in drafter.state_dict().items()}


def test_the_padded_feature_forward_used_off_the_cpu_gives_the_cpu_features():
    """Off the CPU the extractor attends once per layer over the padded batch (no KV cache); forced here on the
    CPU, its features equal the per-sequence path's."""
    target = tiny_target(vocab_size=16, seed=1, num_layers=3)
    extractor = FeatureExtractor(target, [0, 1], max_batch=4, max_length=64)
    cached = extractor(_samples())
    extractor.cache = None
    padded = extractor(_samples())
    for name in ("taps", "last_hidden", "target_lse", "positions", "seq"):
        torch.testing.assert_close(getattr(padded, name), getattr(cached, name), atol=1e-5, rtol=1e-5, msg=name)


@cuda
def test_a_training_run_on_cuda_follows_the_cpu_run(tmp_path):
    """Same data, anchors and initial weights: the losses and the trained weights agree to float tolerance."""
    cpu_losses, cpu_weights = _train("cpu", tmp_path)
    gpu_losses, gpu_weights = _train("cuda", tmp_path)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-3)
    for name, weight in cpu_weights.items():
        torch.testing.assert_close(gpu_weights[name], weight, atol=1e-4, rtol=1e-3, msg=name)


@cuda
def test_greedy_speculation_on_cuda_equals_cpu_autoregression():
    """The torch runtime on the GPU: greedy DSpark tokens are the CPU's plain greedy tokens."""
    target = tiny_target(vocab_size=16, seed=4, num_layers=2, scale=4.0)
    drafter = tiny_drafter(target, block_size=4, seed=5)
    prompts = [[1, 5, 2], [7, 3, 3, 9, 4], [6]]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    outputs = {}
    for device, with_drafter in (("cpu", False), ("cuda", True)):
        runtime = TorchRuntime(target.to(device), drafter.to(device) if with_drafter else None, num_slots=4)
        scheduler = make_scheduler("fixed", block_size=4, gamma=None, threshold=0.5, cost_table=None,
                                   has_confidence=runtime.has_confidence_head) if with_drafter else None
        outputs[device] = [r.output_ids for r in Engine(runtime, scheduler).generate(prompts, params)]
    assert outputs["cuda"] == outputs["cpu"]


def test_a_missing_device_is_named():
    with pytest.raises(DSparkError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DSparkError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
