"""What this x86 CPU is and which of the instructions our kernels use it has.

This project's machines change between sessions (an AVX2 EPYC, a Xeon with AMX), and the same code runs several
times faster on one than the other (bfloat16 matmuls, int4/int8 GEMMs), so every measurement records them."""
from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = "/proc/cpuinfo"
# the instructions that decide our kernels' speed: float32 (avx2, avx512f), int8/int4 dot products
# (avx512_vnni, amx_int8) and bfloat16 matmuls (avx512_bf16, amx_bf16)
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that multiply bfloat16 natively


def _field(name: str, cpuinfo: str | Path) -> str | None:
    """The first value of a /proc/cpuinfo field, None when it cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":", 1)[0].strip() == name),
                None)


def cpu_model(cpuinfo: str | Path = CPUINFO) -> str:
    return _field("model name", cpuinfo) or platform.processor() or "unknown"


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> list[str] | None:
    """The CPU's flags, None when they cannot be read (not Linux, not x86)."""
    flags = _field("flags", cpuinfo)
    return None if flags is None else flags.split()


def kernel_flags(cpuinfo: str | Path = CPUINFO) -> list[str] | None:
    """Which of KERNEL_FLAGS this CPU has, in that order."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else [flag for flag in KERNEL_FLAGS if flag in flags]


def bf16_is_slow(cpuinfo: str | Path = CPUINFO) -> bool:
    """Whether this x86 CPU lacks bfloat16 matmul instructions: there torch emulates bfloat16 and the drafter's
    training step ran 14x slower than in float32 (AVX2, docs/benchmarks.md), where AVX512-BF16 made it 1.3-1.5x
    faster. False when it cannot tell (no cpuinfo)."""
    flags = cpu_flags(cpuinfo)
    return flags is not None and not any(flag in flags for flag in BF16_FLAGS)
