"""CPU defaults chosen by what this CPU supports (load_tests/results/cpu_vs_llamacpp/README.md).

``_int_mm`` (w8a8) is fast where oneDNN has 8-bit dot products (AVX-512 VNNI, AVX-VNNI, AMX); without
them weight-only int8 through ``_weight_int8pack_mm`` has no speed edge either, and float stays the
reference. Compiling the decode step (inductor's C++ backend) needs a C++ compiler at startup.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@dataclass(frozen=True)
class CpuPolicy:
    quantize: str  # --gen-quantize 'auto' on CPU
    compile_decode: bool  # compile decode steps per batch bucket (engine/cuda_graphs.py)
    reason: str


def cpu_policy(features: frozenset[str] | None = None, compiler: str | None = None) -> CpuPolicy:
    """What ``auto`` should mean for generation on this CPU. ``features``/``compiler`` default to
    this machine's (flags from /proc/cpuinfo; the C++ compiler inductor would use)."""
    features = cpu_features() if features is None else features
    compiler = compiler if compiler is not None else _cxx()
    vnni = bool(features & VNNI_FLAGS)
    quantize = "int8"
    compile_decode = bool(compiler)
    reason = (
        f"{'8-bit dot products (' + ', '.join(sorted(features & VNNI_FLAGS)) + ')' if vnni else 'no VNNI/AMX'}; "
        f"{'C++ compiler ' + compiler if compiler else 'no C++ compiler: eager decode'}"
    )
    return CpuPolicy(quantize=quantize, compile_decode=compile_decode, reason=reason)


def _cxx() -> str:
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return ""
