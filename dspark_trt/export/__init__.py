"""ONNX export of the target step and the DSpark drafter (the one intermediate form for ORT and TensorRT)."""
