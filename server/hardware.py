"""What ``auto`` means on this machine: device and dtype, each model's quantization, the prefill budget,
on CPU the torch threads and whether decode steps are compiled, how many API servers, and whether the
engines run on a thread of the server or in engine-core processes.

:meth:`HardwarePolicy.decide` decides it all once, in the process that owns the device (the one-process
server, or each engine core), since the int8-wo kernel's self-check has to run on the device; the builder
(server/runtime.py ``Engines.build``) logs it and ``/info`` shows it. The process layout part
(:func:`api_servers`, :func:`engines_in_process`) reads only the settings and the host, so the supervisor,
which never touches the device, decides it the same way, without importing torch or the kernels: those load on
first use, in the processes that own a device, so a supervisor starts its processes without waiting for
them. The measurements behind the choices:
load_tests/results/compression/README.md#decisions; on CPU models/cpu_policy.py decides by the CPU's
instruction sets and cores (load_tests/results/cpu_vs_llamacpp/README.md).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from models.cpu_policy import CUDA_GEN_PRUNE, CpuPolicy, cpu_policy
from server.config import MAX_API_SERVERS, Settings

if TYPE_CHECKING:
    import torch

INT8_WO_MAX_SEQS = 64  # largest decode batch at which int8-wo measured no slower than bf16 on CUDA
PREFILL_BUDGET = {"cpu": 512, "cuda": 4096}  # padded prompt tokens per prefill step
# Decode steps as torch.compile graphs (engine/cuda_graphs.py): compiled before /ready, in the background after
# it (eager steps until each bucket's graph exists), or never.
CompileDecode = Literal["off", "before_ready", "background"]


class HardwarePolicy(BaseModel):
    """The resolved values; ``why`` gives the reason for each one that was ``auto`` (or unset) in the settings."""

    model_config = ConfigDict(frozen=True)

    device: str
    dtype: str
    gen_quantize: str
    gen_prune: float
    cls_quantize: str
    prefill_budget: int
    cpu_threads: int | None = None  # torch threads on CPU (set before the engine is built); None on CUDA
    compile_decode: CompileDecode = "off"
    engine_core: Literal["thread", "process"]
    api_servers: int
    why: dict[str, str]

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @classmethod
    def decide(cls, settings: Settings) -> HardwarePolicy:
        """Probes the device (and, for ``auto`` generation quantization on CUDA, runs the int8-wo kernel's
        self-check on it)."""
        import torch

        why: dict[str, str] = {}
        device = torch_device(settings)
        if settings.device == "auto":
            why["device"] = "CUDA is available" if device.type == "cuda" else "no CUDA device"
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
            why["dtype"] = f"on {device.type}"
        cpu = cpu_policy() if device.type == "cpu" else None
        gen, cls_ = settings.gen_quantize, settings.cls_quantize
        if gen == "auto":
            gen, why["gen_quantize"] = _auto_gen_quantize(settings, device, getattr(torch, dtype), cpu)
        gen_prune = settings.gen_prune
        if gen_prune is None:
            gen_prune, why["gen_prune"] = (
                (cpu.prune_mlp, cpu.why["prune_mlp"])
                if cpu
                else (CUDA_GEN_PRUNE, "on CUDA: the largest share within +5%")
            )
        if cls_ == "auto":
            # On CPU int8 is faster but fell under the 99% label-agreement bar with float on held-out intents in
            # some modes (load_tests/results/classify_quality/README.md), so the classifier stays float.
            cls_ = "none"
            why["cls_quantize"] = (
                "float: the only setting with >= 99% label agreement on held-out intents in every mode"
                if device.type == "cpu"
                else "quantized ran slower on CUDA"
            )
        prefill = settings.max_batched_tokens
        if prefill is None:
            prefill = PREFILL_BUDGET[device.type]
            why["prefill_budget"] = f"on {device.type}"
        cpu_threads = _cpu_threads(settings, cpu, why)
        compiled = _compile_decode(settings, device, cpu, why)
        in_process = engines_in_process(settings)
        if settings.engine_core == "auto":
            alone = "one API server and engine, CPU"
            why["engine_core"] = alone if in_process else "CUDA, several API servers or data parallel"
        if settings.api_servers is None:
            threads = settings.engine_core == "thread"
            cores = f"for {usable_cpus()} usable CPU cores, data parallel {settings.data_parallel_size}"
            why["api_servers"] = "engine_core=thread" if threads else cores
        return cls(
            device=str(device),
            dtype=dtype,
            gen_quantize=gen,
            gen_prune=gen_prune,
            cls_quantize=cls_,
            prefill_budget=prefill,
            cpu_threads=cpu_threads,
            compile_decode=compiled,
            engine_core="thread" if in_process else "process",
            api_servers=api_servers(settings),
            why=why,
        )

    def summary(self) -> str:
        """One log line: each value, with the reason where the settings left it to ``auto``."""
        values = self.model_dump(exclude={"why"})
        return ", ".join(f"{k}={v}" + (f" (auto: {self.why[k]})" if k in self.why else "") for k, v in values.items())


def torch_device(settings: Settings) -> torch.device:
    import torch

    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    return torch.device(settings.device)


def _cpu_threads(settings: Settings, cpu: CpuPolicy | None, why: dict[str, str]) -> int | None:
    """Torch threads on CPU; None on CUDA."""
    if cpu is None or settings.cpu_threads is not None:
        return None if cpu is None else settings.cpu_threads
    why["cpu_threads"] = cpu.why["threads"]
    return cpu.threads


def _compile_decode(
    settings: Settings, device: torch.device, cpu: CpuPolicy | None, why: dict[str, str]
) -> CompileDecode:
    """Compiled decode steps: fewer, fused kernels per step on CUDA (load_tests/results/fused_decode/) for
    about a minute of compiling before /ready at a fresh start; on CPU faster steps too, but a fresh start of
    a small machine compiles for minutes (load_tests/results/cpu_vs_llamacpp/), so ``auto`` compiles there
    after /ready, in a low-priority child process, serving eager steps meanwhile. ``on`` compiles before /ready."""
    if settings.compile_decode == "off":
        return "off"
    if settings.compile_decode == "on":
        return "before_ready"
    if cpu is not None and settings.tensor_parallel_size > 1:  # compiled steps' all-reduce: models/tensor_parallel.py
        why["compile_decode"] = (
            "tensor parallel on CPU: eager steps (the background compiler process joins no process group); "
            "--compile-decode on compiles before /ready"
        )
        return "off"
    if cpu is not None:
        if not cpu.compile_decode:
            why["compile_decode"] = cpu.why["compile_decode"]
            return "off"
        why["compile_decode"] = (
            f"CPU with {cpu.why['compile_decode']}: compiled steps decode faster, but a fresh start compiles for "
            "minutes, so they compile after /ready in a low-priority process (eager steps until then); "
            "--compile-decode on compiles before /ready"
        )
        return "background"
    from models import paged_attention

    usable = paged_attention.available(device)
    why["compile_decode"] = "CUDA with Triton: fused kernels in the decode graphs" if usable else "no Triton"
    return "before_ready" if usable else "off"


def _auto_gen_quantize(
    settings: Settings, device: torch.device, dtype: torch.dtype, cpu: CpuPolicy | None
) -> tuple[str, str]:
    from models import quant_kernels

    if cpu is not None:
        return cpu.quantize, cpu.why["quantize"]
    if settings.max_num_seqs > INT8_WO_MAX_SEQS:
        return "none", f"max_num_seqs {settings.max_num_seqs} > {INT8_WO_MAX_SEQS}, where int8-wo decodes slower"
    # Without the kernel (no Triton, fp32, a failed self-check) int8-wo would dequantize per call.
    if not quant_kernels.usable(device, dtype):
        return "none", "the int8-wo kernel does not run here"
    return "int8-wo", f"max_num_seqs {settings.max_num_seqs} <= {INT8_WO_MAX_SEQS} and the int8-wo kernel runs here"


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's cpuset), not the host's."""
    return len(os.sched_getaffinity(0))


def api_servers(settings: Settings) -> int:
    """As set; else one with ``engine_core=thread`` or up to 4 CPU cores, else half the cores, at most 8 per
    engine core: each data-parallel GPU gets the API servers one GPU is served by, as a replica would."""
    if settings.api_servers is not None:
        return settings.api_servers
    if settings.engine_core == "thread":
        return 1
    cores = usable_cpus()
    return 1 if cores <= 4 else min(8 * settings.data_parallel_size, cores // 2, MAX_API_SERVERS)


def engines_in_process(settings: Settings) -> bool:
    """Engines on a thread of the one server process, or in engine-core processes: ``auto`` takes the
    thread only for one API server and one engine on CPU."""
    if settings.engine_core != "auto":
        return settings.engine_core == "thread"
    several = api_servers(settings) > 1 or settings.data_parallel_size > 1
    return not several and torch_device(settings).type == "cpu"
