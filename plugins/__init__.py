"""The DSparkVerify op, installed as `dspark_trt_plugins`.

Its one semantics is the torch reference `dspark_trt.spec.verify.dspark_verify`; the Triton-language
kernel (`triton_kernel`), the TensorRT plugin registration (`trt_plugin`) and the ONNX Runtime custom
op (`ort_op`, whose compute is the reference itself) are each tested against it (issue #7).
"""
from dspark_trt.spec.verify import VerifyResult, dspark_verify

__all__ = ["dspark_verify", "VerifyResult"]
