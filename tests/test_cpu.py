"""What the CPU readers make of /proc/cpuinfo (files written here, so the test does not depend on this machine)."""
from dspark_trt.cpu import bf16_is_slow, cpu_model, kernel_flags


def test_bf16_is_slow_reads_the_cpus_bfloat16_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert bf16_is_slow(cpuinfo)  # AVX2 only: emulated
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert not bf16_is_slow(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert not bf16_is_slow(cpuinfo)
    assert not bf16_is_slow(tmp_path / "missing")  # cannot tell: no warning


def test_kernel_flags_and_model_read_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                       "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_int8 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) Processor"
    assert kernel_flags(cpuinfo) == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"]
    assert kernel_flags(tmp_path / "missing") is None
