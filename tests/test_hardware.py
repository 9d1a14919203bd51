"""What ``auto`` settings resolve to on a device (server/hardware.py), with the device and the int8-wo
kernel's self-check faked: no GPU needed."""

from __future__ import annotations

import pytest
import torch

from models import quant_kernels
from server.config import Settings
from server.hardware import HardwarePolicy, api_servers, engines_in_process

pytestmark = pytest.mark.unit


def test_cpu_defaults() -> None:
    policy = HardwarePolicy.decide(Settings(device="cpu"))
    assert (policy.torch_device, policy.torch_dtype) == (torch.device("cpu"), torch.float32)
    assert (policy.gen_quantize, policy.cls_quantize, policy.prefill_budget) == ("int8", "int8", 512)
    assert set(policy.why) >= {"dtype", "gen_quantize", "cls_quantize", "prefill_budget"}
    assert "gen_quantize=int8 (auto: w8a8 with SmoothQuant, the fastest on CPU)" in policy.summary()
    explicit = HardwarePolicy.decide(Settings(device="cpu", dtype="bfloat16", max_batched_tokens=64))
    assert (explicit.dtype, explicit.prefill_budget) == ("bfloat16", 64)
    assert "dtype" not in explicit.why and "prefill_budget" not in explicit.why


@pytest.mark.parametrize(
    ("device", "max_num_seqs", "kernel", "gen", "cls"),
    [("cpu", 256, False, "int8", "int8"), ("cuda", 16, True, "int8-wo", "none"), ("cuda", 64, True, "int8-wo", "none"),
     ("cuda", 65, True, "none", "none"), ("cuda", 16, False, "none", "none")],
)  # fmt: skip
def test_auto_quantization_follows_the_measured_table(
    monkeypatch: pytest.MonkeyPatch, device: str, max_num_seqs: int, kernel: bool, gen: str, cls: str
) -> None:
    """'auto' resolves per device (and, on CUDA, per decode batch and whether the int8 kernel runs) as
    load_tests/results/compression decided; an explicit method always wins."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(quant_kernels, "usable", lambda device, dtype: kernel)
    policy = HardwarePolicy.decide(Settings(max_num_seqs=max_num_seqs))
    assert (policy.device, policy.gen_quantize, policy.cls_quantize) == (device, gen, cls)
    assert policy.prefill_budget == (512 if device == "cpu" else 4096)
    explicit = HardwarePolicy.decide(Settings(max_num_seqs=max_num_seqs, gen_quantize="fp8", cls_quantize="int8-wo"))
    assert (explicit.gen_quantize, explicit.cls_quantize) == ("fp8", "int8-wo")


def test_device_cuda_needs_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        HardwarePolicy.decide(Settings(device="cuda"))


def test_process_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """One API server with the engines on its thread on a small CPU host; engine cores on CUDA, for
    several API servers or data parallel; the policy says the same as the supervisor's functions."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert api_servers(Settings()) == 1 and engines_in_process(Settings())
    assert api_servers(Settings(api_servers=3)) == 3 and not engines_in_process(Settings(api_servers=3))
    assert not engines_in_process(Settings(data_parallel_size=2))
    policy = HardwarePolicy.decide(Settings())
    assert (policy.engine_core, policy.api_servers) == ("thread", 1)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert api_servers(Settings()) == 8 and api_servers(Settings(engine_core="thread")) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 12)
    assert api_servers(Settings()) == 6
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert not engines_in_process(Settings()) and engines_in_process(Settings(engine_core="thread"))
