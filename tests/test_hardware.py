"""What ``auto`` settings resolve to on a device (server/hardware.py), with the device and the int8-wo
kernel's self-check faked: no GPU needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import cpu_policy as cpu
from models import paged_attention, quant_kernels
from server import hardware
from server.config import Settings
from server.hardware import HardwarePolicy, api_servers, engines_in_process

pytestmark = pytest.mark.unit

AMX = frozenset({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"})
VNNI = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni"})
AVX2 = frozenset({"avx", "avx2", "fma"})


def fake_cpu(
    monkeypatch: pytest.MonkeyPatch, features: frozenset[str], compiler: str = "/usr/bin/g++", cores: int = 2
) -> None:
    """This machine's CPU as ``features``, ``compiler`` and ``cores`` for the policy; no CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_policy", lambda: cpu.cpu_policy(features, compiler, cores))


def test_cpu_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, VNNI)
    policy = HardwarePolicy.decide(Settings(device="cpu", compile_decode="auto"))
    assert (policy.torch_device, policy.torch_dtype) == (torch.device("cpu"), torch.float32)
    assert (policy.gen_quantize, policy.cls_quantize, policy.prefill_budget) == ("int8", "none", 512)
    assert (policy.cpu_threads, policy.compile_decode) == (2, "background")
    assert set(policy.why) >= {"dtype", "gen_quantize", "cls_quantize", "prefill_budget", "cpu_threads"}
    assert "gen_quantize=int8 (auto: int8 w8a8 (VNNI: " in policy.summary()
    assert "compile_decode=background (auto: CPU with a C++ compiler (/usr/bin/g++) for inductor: " in policy.summary()
    assert "compile after /ready in a low-priority process" in policy.why["compile_decode"]
    explicit = HardwarePolicy.decide(Settings(device="cpu", dtype="bfloat16", max_batched_tokens=64))
    assert (explicit.dtype, explicit.prefill_budget) == ("bfloat16", 64)
    assert "dtype" not in explicit.why and "prefill_budget" not in explicit.why


@pytest.mark.parametrize(
    ("device", "max_num_seqs", "kernel", "gen", "cls"),
    [("cpu", 256, False, "int8", "none"), ("cuda", 16, True, "int8-wo", "none"), ("cuda", 64, True, "int8-wo", "none"),
     ("cuda", 65, True, "none", "none"), ("cuda", 16, False, "none", "none")],
)  # fmt: skip
def test_auto_quantization_follows_the_measured_table(
    monkeypatch: pytest.MonkeyPatch, device: str, max_num_seqs: int, kernel: bool, gen: str, cls: str
) -> None:
    """'auto' resolves per device (and, on CUDA, per decode batch and whether the int8 kernel runs) as
    load_tests/results/compression decided; an explicit method always wins."""
    fake_cpu(monkeypatch, VNNI)  # a CPU whose kind takes int8 (the kinds: test_auto_on_cpu_follows_the_cpu_kind)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(quant_kernels, "usable", lambda device, dtype: kernel)
    policy = HardwarePolicy.decide(Settings(max_num_seqs=max_num_seqs))
    assert (policy.device, policy.gen_quantize, policy.cls_quantize) == (device, gen, cls)
    assert policy.prefill_budget == (512 if device == "cpu" else 4096)
    explicit = HardwarePolicy.decide(Settings(max_num_seqs=max_num_seqs, gen_quantize="fp8", cls_quantize="int8-wo"))
    assert (explicit.gen_quantize, explicit.cls_quantize) == ("fp8", "int8-wo")


@pytest.mark.parametrize(("device", "share"), [("cpu", 0.005), ("cuda", 0.01)])
def test_unset_gen_prune_follows_the_device(monkeypatch: pytest.MonkeyPatch, device: str, share: float) -> None:
    """Unset, the generation pruning share is the device's measured one (CPU int8 w8a8: 0.5%, held within
    +5% through the decode step; CUDA int8-wo: 1%); a share that is set wins."""
    fake_cpu(monkeypatch, VNNI)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(quant_kernels, "usable", lambda device, dtype: True)
    policy = HardwarePolicy.decide(Settings())
    assert policy.gen_prune == share and f"gen_prune={share} (auto: " in policy.summary()
    explicit = HardwarePolicy.decide(Settings(gen_prune=0.02))
    assert explicit.gen_prune == 0.02 and "gen_prune" not in explicit.why


def test_device_cuda_needs_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        HardwarePolicy.decide(Settings(device="cuda"))


def test_process_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """One API server with the engines on its thread on a small CPU host; engine cores on CUDA, for
    several API servers or data parallel; the policy says the same as the supervisor's functions."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(2)))
    assert api_servers(Settings()) == 1 and engines_in_process(Settings())
    assert api_servers(Settings(api_servers=3)) == 3 and not engines_in_process(Settings(api_servers=3))
    assert not engines_in_process(Settings(data_parallel_size=2))
    policy = HardwarePolicy.decide(Settings())
    assert (policy.engine_core, policy.api_servers) == ("thread", 1)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(64)))
    assert api_servers(Settings()) == 8 and api_servers(Settings(engine_core="thread")) == 1
    assert api_servers(Settings(data_parallel_size=2)) == 16  # 8 per GPU, as two replicas would have
    assert api_servers(Settings(data_parallel_size=8)) == 32  # half the cores
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(512)))
    assert api_servers(Settings(data_parallel_size=16)) == 64  # the setting's own bound
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(12)))
    assert api_servers(Settings()) == 6
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(2)))
    assert not engines_in_process(Settings()) and engines_in_process(Settings(engine_core="thread"))


@pytest.mark.parametrize(
    ("features", "quantize", "prune", "reason"),
    [
        (AMX, "int8", 0.005, "int8 w8a8 (AMX"),
        (VNNI, "int8", 0.005, "int8 w8a8 (VNNI"),
        (AVX2, "none", 0.0, "float (AVX2 only"),
        (frozenset({"sse4_2"}), "none", 0.0, "float (no AVX2"),
    ],
)
def test_auto_on_cpu_follows_the_cpu_kind(
    monkeypatch: pytest.MonkeyPatch, features: frozenset[str], quantize: str, prune: float, reason: str
) -> None:
    """CPUs with 8-bit dot-product instructions get int8 w8a8 (pruned 0.5%), others float weights as they are
    (int8 w8a8 measured slower than float there), with the evidence for the kind as the reason; decode steps
    compiled after /ready where a C++ compiler exists (compiling takes minutes), else eager; a thread per
    physical core."""
    fake_cpu(monkeypatch, features, cores=6)
    policy = HardwarePolicy.decide(Settings(compile_decode="auto"))
    expected = ("cpu", quantize, prune, "background", 6)
    assert (policy.device, policy.gen_quantize, policy.gen_prune, policy.compile_decode, policy.cpu_threads) == expected
    assert policy.why["gen_quantize"].startswith(reason)
    assert policy.why["cpu_threads"] == "6 physical core(s) available"
    fake_cpu(monkeypatch, features, compiler="")
    policy = HardwarePolicy.decide(Settings(compile_decode="auto"))
    assert policy.compile_decode == "off" and "no C++ compiler" in policy.why["compile_decode"]


def test_explicit_cpu_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, AMX, cores=8)
    policy = HardwarePolicy.decide(Settings(compile_decode="off", cpu_threads=3, gen_quantize="int8-wo"))
    assert (policy.gen_quantize, policy.compile_decode, policy.cpu_threads) == ("int8-wo", "off", 3)
    assert not {"gen_quantize", "compile_decode", "cpu_threads"} & set(policy.why)
    fake_cpu(monkeypatch, AMX, compiler="")
    assert HardwarePolicy.decide(Settings(compile_decode="on")).compile_decode == "before_ready"  # as asked


def test_no_cpu_threads_on_cuda_and_compiled_steps_with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(quant_kernels, "usable", lambda device, dtype: True)
    for triton, compiled in ((True, "before_ready"), (False, "off")):
        monkeypatch.setattr(paged_attention, "available", lambda device, t=triton: t)
        policy = HardwarePolicy.decide(Settings(cpu_threads=4, compile_decode="auto"))
        assert (policy.cpu_threads, policy.compile_decode) == (None, compiled)
        assert "cpu_threads" not in policy.why and "compile_decode" in policy.why


def test_physical_cores_count_hyperthreads_once(tmp_path: Path) -> None:
    """Two cores with two hyperthreads each: four logical CPUs are two cores; CPUs 0 and 1 (siblings on
    core 0) are one; without core ids, each logical CPU counts."""
    info = tmp_path / "cpuinfo"
    procs = [(0, 0), (1, 0), (2, 1), (3, 1)]  # (processor, core id)
    info.write_text(
        "\n\n".join(f"processor\t: {p}\nphysical id\t: 0\ncore id\t\t: {c}\nflags\t: avx2" for p, c in procs)
    )
    assert cpu.physical_cores({0, 1, 2, 3}, info) == 2
    assert cpu.physical_cores({0, 1}, info) == 1
    info.write_text("processor\t: 0\n\nprocessor\t: 1\n")
    assert cpu.physical_cores({0, 1}, info) == 2
    assert cpu.physical_cores({0, 1, 2}, tmp_path / "absent") == 3


@pytest.mark.unit
def test_tensor_parallel_compiles_its_steps_except_in_the_cpu_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled steps sum through an opaque all-reduce op (models/tensor_parallel.py): on CUDA they compile as
    one GPU's do; on CPU ``auto`` stays eager (the background compiler process joins no process group), ``on``
    compiles before /ready on every rank, ``off`` is off."""
    fake_cpu(monkeypatch, VNNI)
    policy = HardwarePolicy.decide(Settings(device="cpu", compile_decode="auto", tensor_parallel_size=3))
    assert policy.compile_decode == "off" and "tensor parallel" in policy.why["compile_decode"]
    on = HardwarePolicy.decide(Settings(device="cpu", compile_decode="on", tensor_parallel_size=3))
    assert on.compile_decode == "before_ready"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(quant_kernels, "usable", lambda device, dtype: True)
    monkeypatch.setattr(paged_attention, "available", lambda device: True)
    for asked, compiled in (("auto", "before_ready"), ("off", "off")):
        policy = HardwarePolicy.decide(Settings(compile_decode=asked, tensor_parallel_size=2))
        assert policy.compile_decode == compiled
