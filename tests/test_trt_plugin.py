"""The DSparkVerify TensorRT plugin: a clear error without TensorRT; on a GPU host, a one-node
network built with the plugin gives the reference's accepted counts and next tokens."""
import importlib.util

import pytest
import torch

from dspark_trt.errors import DSparkError
from dspark_trt.spec.verify import dspark_verify
from dspark_trt_plugins import trt_plugin

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_register_without_tensorrt_names_the_problem():
    with pytest.raises(DSparkError, match="tensorrt is not installed"):
        trt_plugin.register_plugin()


def _build_and_run(inputs: dict[str, torch.Tensor], has_draft_probs: int):
    import tensorrt as trt

    trtp = trt_plugin.register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    dtypes = {torch.float32: trt.float32, torch.int64: trt.int64}
    tensors = [network.add_input(name, dtypes[t.dtype], tuple(t.shape)) for name, t in inputs.items()]
    layer = network.add_plugin(trtp.op.dspark.DSparkVerify(*tensors, has_draft_probs=has_draft_probs))
    for i, name in enumerate(("accepted", "next_token")):
        layer.get_output(i).name = name
        network.mark_output(layer.get_output(i))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None, "TensorRT could not build the one-node DSparkVerify network"
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    n_req = inputs["temperature"].shape[0]
    outputs = {name: torch.empty(n_req, dtype=torch.long, device="cuda") for name in ("accepted", "next_token")}
    cuda_inputs = {name: t.cuda().contiguous() for name, t in inputs.items()}
    for name, t in {**cuda_inputs, **outputs}.items():
        context.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return outputs["accepted"].cpu(), outputs["next_token"].cpu()


@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed (no NVIDIA GPU host)")
@pytest.mark.parametrize("with_q", [False, True])
def test_plugin_matches_reference(with_q):
    from test_verify_triton import _case, _stable_uniforms

    case, g = _case(11, 128, [3, 1, 4, 2], with_q)
    u, expected = _stable_uniforms(case, g)
    q = case["draft_probs"] if with_q else torch.zeros(case["draft_tokens"].numel(), 128)
    inputs = {"target_logits": case["target_logits"], "draft_tokens": case["draft_tokens"], "draft_probs": q,
              "row_offsets": case["row_offsets"], "temperature": case["temperature"], "top_k": case["top_k"],
              "top_p": case["top_p"], "uniforms": u.float()}
    accepted, next_token = _build_and_run(inputs, int(with_q))
    assert torch.equal(accepted, expected.accepted)
    assert torch.equal(next_token, expected.next_token)
