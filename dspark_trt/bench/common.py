"""What every benchmark result records: machine, versions, revision, command."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from dspark_trt.cpu import cpu_model, kernel_flags


def environment() -> dict:
    import transformers

    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {
        "machine": platform.machine(), "cpu": cpu_model(), "cpu_flags": kernel_flags(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "git_revision": revision,
        "command": "dspark-trt " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("dspark-trt") else " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def timed(fn):
    """(result, seconds) of fn()."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
