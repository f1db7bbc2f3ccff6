"""dspark-trt: DSpark speculative decoding on ONNX Runtime / TensorRT engines, served by Triton."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy public API, so `import dspark_trt` stays cheap (no torch import)."""
    if name == "load_drafter":
        from dspark_trt.models.drafter_checkpoint import load_drafter

        return load_drafter
    raise AttributeError(f"module 'dspark_trt' has no attribute {name!r}")
