"""DSparkVerify as a TensorRT Python plugin (`tensorrt.plugin`, JIT): `dspark::DSparkVerify`.

The op follows plugins/SCHEMA.md; its implementation launches the Triton kernel of triton_kernel.py on
TensorRT's stream, so TensorRT, Triton and the torch reference share one semantics. Two deviations
forced by TensorRT: draft_probs is always an input (attribute `has_draft_probs` = 0 means greedy
drafting and the tensor is ignored) and uniforms are float32 (TensorRT has no float64 tensors).
A JIT plugin needs this module imported wherever the plan is built or deserialized (Python only; an
`aot_impl` for trtexec / Triton's TensorRT backend is not written yet). tensorrt is imported only when
`register_plugin()` is called, so the module imports on hosts without it.
"""
from __future__ import annotations

from dspark_trt.errors import DSparkError

PLUGIN_ID = "dspark::DSparkVerify"
TENSORRT_MISSING = "tensorrt is not installed (no NVIDIA GPU host); the DSparkVerify TensorRT plugin needs it"

_registered = None


def register_plugin():
    """Register `dspark::DSparkVerify` with TensorRT (once) and return the `tensorrt.plugin` module.

    Use it as `network.add_plugin(trtp.op.dspark.DSparkVerify(*inputs, has_draft_probs=1))`.
    """
    global _registered
    if _registered is not None:
        return _registered
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise DSparkError(TENSORRT_MISSING) from exc

    @trtp.register(PLUGIN_ID)
    def _describe(target_logits: trtp.TensorDesc, draft_tokens: trtp.TensorDesc,
                  draft_probs: trtp.TensorDesc, row_offsets: trtp.TensorDesc,
                  temperature: trtp.TensorDesc, top_k: trtp.TensorDesc, top_p: trtp.TensorDesc,
                  uniforms: trtp.TensorDesc, has_draft_probs: int):
        n_req = (temperature.shape_expr[0],)
        return (trtp.from_shape_expr(n_req, dtype=trt.int64),
                trtp.from_shape_expr(n_req, dtype=trt.int64))

    @trtp.autotune(PLUGIN_ID)
    def _formats(target_logits, draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p,
                 uniforms, has_draft_probs, outputs):
        return [trtp.AutoTuneCombination("FP32, INT64, FP32, INT64, FP32, INT64, FP32, FP32, INT64, INT64")]

    @trtp.impl(PLUGIN_ID)
    def _run(target_logits, draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p,
             uniforms, has_draft_probs, outputs, stream):
        import torch

        from dspark_trt_plugins.triton_kernel import dspark_verify_triton

        def wrap(t):
            return torch.as_tensor(t, device="cuda")

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            result = dspark_verify_triton(
                wrap(target_logits), wrap(draft_tokens), wrap(draft_probs) if has_draft_probs else None,
                wrap(row_offsets), wrap(temperature), wrap(top_k), wrap(top_p), wrap(uniforms))
            wrap(outputs[0]).copy_(result.accepted)
            wrap(outputs[1]).copy_(result.next_token)

    _registered = trtp
    return trtp
