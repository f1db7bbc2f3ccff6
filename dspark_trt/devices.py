"""Where the torch code runs: the CPU here, an accelerator torch knows where there is one.

Models make tensors as they run (positions, masks, buffers). On an accelerator those must be made there, which
`device_scope` arranges by making it torch's default device for a block; on the CPU, the default already, it adds
nothing, since the default-device mode costs a few microseconds on every torch call."""
from __future__ import annotations

import contextlib

import torch

from dspark_trt.errors import DSparkError


def device_scope(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A block in which new tensors are made on `device`."""
    device = torch.device(device)
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)


def resolve_device(name: str) -> torch.device:
    """The torch device a user named (cpu, cuda, cuda:1), checked to exist before anything slow starts."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DSparkError(f"device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DSparkError(f"device {name}: torch sees no CUDA device here (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DSparkError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
