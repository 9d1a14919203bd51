"""CPU generation defaults by what this CPU supports; server/hardware.py applies them to ``auto`` settings.

The measurements (load_tests/results/cpu_vs_llamacpp/README.md, "Defaults per CPU", which holds the figures)
and what they decide:

- Quantization: int8 w8a8 (``_int_mm``) where the CPU has 8-bit dot-product instructions. With AVX-512 VNNI
  (an AMD EPYC of family 26) it beat float and weight-only int8 at every batch size (quant_native.json); on the
  Intel Xeon with AMX of issue 12 (eager steps) it was slightly faster than float. On a CPU with AVX2 alone
  (an AMD EPYC of family 25, Zen 3) it lost to float everywhere measured, 1.2-2x at batch 1 and 4-7x at 16
  sequences (zen3/, "A real AVX2-only CPU"; the earlier AVX2 *cap* on the VNNI machine had predicted the
  opposite), so there generation stays float and unpruned; weight-only int8, faster than float there at batch 1
  and slower at 16, is an opt-in. The reason names the evidence for this CPU's kind.
- Compiled decode steps (inductor's C++ backend) wherever a C++ compiler exists: they remove the
  per-op dispatch of the eager step, which is not tied to an instruction set; measured faster than the
  eager step at every batch size and thread count with AVX-512 VNNI; not measured under the AVX2 cap
  or on AMX. The first start compiles for minutes, so ``auto`` compiles after ``/ready`` in the background
  (server/hardware.py); later starts load the graphs from the inductor cache.
- Pruning, with int8 w8a8: 0.5% of MLP channels (three blocks of 64), less than the CUDA default prunes. int8 w8a8 turns
  float rounding differences into different int8 roundings, so one 512-token context scores a spread of
  perplexities (prefill, decode step, compiled step are draws from it); at 1% the served decode step
  crossed the perplexity bar against float on single contexts, at 0.5% no decode-step draw of any did, and
  the window averages stayed within it (load_tests/results/cpu_vs_llamacpp/decode_fidelity/README.md, "The
  choice"). Float weights are not pruned.
- Threads: one per physical core this process may use. Two threads on one core's hyperthreads share
  its execution units (issue 12's 2-vCPU Xeon ran eager steps faster with one thread than two), while
  on two cores compiled steps ran faster with two threads than with one (load_tests/results/cpu_vs_llamacpp/
  README.md, "The compiled decode step against llama.cpp").
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
AMX_FLAGS = frozenset({"amx_int8", "amx_tile"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


@functools.cache
def cpu_features(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def physical_cores(cpus: set[int] | None = None, cpuinfo: Path = CPUINFO) -> int:
    """Distinct physical cores among the logical CPUs ``cpus`` (default: those this process may run on);
    the number of those CPUs where /proc/cpuinfo does not say which core each is."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    try:
        text = cpuinfo.read_text()
    except OSError:
        return max(1, len(cpus))
    cores = set()
    for block in text.split("\n\n"):
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
        if "processor" not in fields or "core id" not in fields:
            continue
        if int(fields["processor"]) in cpus:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or max(1, len(cpus))


def cpu_kind(features: frozenset[str]) -> str:
    """The instruction-set class that CPU measurements are grouped by."""
    if features & AMX_FLAGS:
        return "amx"
    if features & VNNI_FLAGS:
        return "vnni"
    return "avx2" if "avx2" in features else "baseline"


QUANTIZE = {  # CPU kind -> (generation's quantization, the evidence for it)
    "amx": ("int8", "int8 w8a8 (AMX: int8 faster than float in issue 12's eager Xeon measurement; compiled not "
            "measured there)"),
    "vnni": ("int8", "int8 w8a8 (VNNI: faster than float and than weight-only int8 at 1 and 16 sequences, measured)"),
    "avx2": ("none", "float (AVX2 only: int8 w8a8 measured slower than float at 1 and 16 sequences on an AMD EPYC "
             "Zen 3)"),
    "baseline": ("none", "float (no AVX2: not measured; the kind measured nearest, AVX2, favours it)"),
}  # fmt: skip


PRUNE_MLP = 0.005
PRUNE_EVIDENCE = (
    "0.5%: the largest share whose int8 w8a8 decode step stayed within the perplexity bar on every context measured "
    "(load_tests/results/cpu_vs_llamacpp/decode_fidelity/README.md)"
)
FLOAT_PRUNE_EVIDENCE = "none: float weights are served as they are (pruning would only cost quality)"
# Generation's pruning share on CUDA when unset, for the server (server/hardware.py) and the offline stage
# (models/compress_cli.py); kept beside the CPU share so both defaults live in one place. Chosen in
# load_tests/results/compression/README.md#decisions.
CUDA_GEN_PRUNE = 0.01


@dataclass(frozen=True)
class CpuPolicy:
    """What ``auto`` means for generation on this CPU, with one reason per value (logged, at /info)."""

    quantize: str  # --gen-quantize auto
    prune_mlp: float  # --gen-prune unset
    compile_decode: bool  # whether decode steps can compile here (a C++ compiler for inductor)
    threads: int  # --cpu-threads unset
    why: dict[str, str] = field(default_factory=dict)


def cpu_policy(
    features: frozenset[str] | None = None, compiler: str | None = None, cores: int | None = None
) -> CpuPolicy:
    """``features`` / ``compiler`` / ``cores`` default to this machine's (flags from /proc/cpuinfo; the C++
    compiler inductor would use; physical cores this process may use)."""
    features = cpu_features() if features is None else features
    compiler = _cxx() if compiler is None else compiler
    cores = physical_cores() if cores is None else cores
    kind = cpu_kind(features)
    quantize, evidence = QUANTIZE[kind]
    prune = PRUNE_MLP if quantize == "int8" else 0.0
    why = {
        "quantize": evidence,
        "prune_mlp": PRUNE_EVIDENCE if prune else FLOAT_PRUNE_EVIDENCE,
        "compile_decode": f"a C++ compiler ({compiler}) for inductor" if compiler else "no C++ compiler: eager steps",
        "threads": f"{cores} physical core(s) available",
    }
    return CpuPolicy(quantize=quantize, prune_mlp=prune, compile_decode=bool(compiler), threads=cores, why=why)


def _cxx() -> str:
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return ""
