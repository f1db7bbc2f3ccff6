"""Runtimes the engine can drive: torch (reference), ONNX Runtime, TensorRT."""
