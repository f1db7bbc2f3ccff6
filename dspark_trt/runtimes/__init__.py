"""Runtimes the engine can drive: torch (reference), ONNX Runtime, TensorRT, and the BLS split across Triton models."""
