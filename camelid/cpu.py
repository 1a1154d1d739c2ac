"""What this CPU can do, read at run time (never assumed: one machine of a kind has AVX-512 and AMX, the next AVX2)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo reports (empty where there is none, as on macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), []))
    except OSError:
        return frozenset()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16), checked at run time:
    oneDNN must support bf16 here and the CPU must report the instructions (plain AVX512 or AVX2 only emulate them,
    several times slower than float32)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
    except (AttributeError, RuntimeError):
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_features() -> str:
    """The CPU's instruction-set flags that matter to generated code and packed weights (part of the keys of what
    the store keeps per machine: the compiled decode step, the converted model)."""
    import platform

    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return platform.machine() + ":" + ",".join(w for w in wanted if w in cpu_flags())


def cpu_model() -> str:
    """The CPU's model name, to print next to every figure (platform's guess where /proc/cpuinfo has none)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine() or "unknown CPU"
