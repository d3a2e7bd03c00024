"""What the CPU offers for int8 inference: figures of speed name it, since they depend on it.

>>> describe_int8_support(frozenset({"avx2", "avx512_vnni"}))
'AVX-512 VNNI'
>>> describe_int8_support(frozenset({"avx2"}))
'AVX2, no VNNI'
"""

from __future__ import annotations

import platform
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags; empty where the system does not say."""
    return frozenset(_cpuinfo("flags").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpuinfo(key: str) -> str:
    """The first CPU's ``key`` line of /proc/cpuinfo, its value stripped ('' if none)."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return ""
    line = next((line for line in text.splitlines() if line.startswith(key)), "")
    return line.partition(":")[2].strip()


def describe_int8_support(flags: frozenset[str] | None = None) -> str:
    """The instructions onnxruntime's int8 kernels use here, in a few words ('' if unknown)."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return ""
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    return "AVX2, no VNNI" if "avx2" in flags else "no AVX2"
