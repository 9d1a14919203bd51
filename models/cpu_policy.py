"""CPU defaults by what this CPU supports (measurements: load_tests/results/cpu_vs_llamacpp/README.md).

Quantization: int8 w8a8 (``_int_mm``) with or without 8-bit dot-product instructions. Capped to AVX2 its
decode step slows ~2x at batch 1 but still beats float at 1 and 16 sequences, while weight-only int8,
faster there at batch 1, is several times slower at 16. Decode steps are compiled (inductor's C++
backend) wherever a C++ compiler exists: on the AVX-512 CPU measured that beat the eager step at every
batch size and thread count (not measured under the AVX2 cap).
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
    quantize: str  # what --gen-quantize 'auto' means on this CPU
    compile_decode: bool  # ModelRunner(compile_cpu=...): decode steps compiled per batch bucket
    reason: str  # one line for the startup log and /info


def cpu_policy(features: frozenset[str] | None = None, compiler: str | None = None) -> CpuPolicy:
    """What ``auto`` should mean for generation on this CPU. ``features``/``compiler`` default to
    this machine's (flags from /proc/cpuinfo; the C++ compiler inductor would use)."""
    features = cpu_features() if features is None else features
    compiler = compiler if compiler is not None else _cxx()
    dot8 = sorted(features & VNNI_FLAGS)
    quantize_why = f"int8 w8a8 ({', '.join(dot8)})" if dot8 else "int8 w8a8 (no VNNI/AMX: still faster than float)"
    compile_why = f"compiled decode ({compiler})" if compiler else "eager decode (no C++ compiler)"
    return CpuPolicy(quantize="int8", compile_decode=bool(compiler), reason=f"{quantize_why}; {compile_why}")


def _cxx() -> str:
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return ""
