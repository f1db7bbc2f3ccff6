"""dspark-trt: DSpark speculative decoding on ONNX Runtime / TensorRT engines, served by Triton."""

__version__ = "0.1.0"
