"""Settings to engine configuration, without building an engine."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.hardware import HardwarePolicy
from server.runtime import engine_config

pytestmark = pytest.mark.unit


def policy(device: str) -> HardwarePolicy:
    return HardwarePolicy(
        device=device,
        dtype="float32",
        gen_quantize="none",
        cls_quantize="none",
        prefill_budget=512,
        engine_core="thread",
        api_servers=1,
        why={},
    )


def test_compiled_cpu_decode_is_opt_in_and_cpu_only() -> None:
    assert engine_config(Settings(), policy("cpu")).compile_cpu is False
    assert engine_config(Settings(cpu_compile_decode=True), policy("cpu")).compile_cpu is True
    assert engine_config(Settings(cpu_compile_decode=True), policy("cuda")).compile_cpu is False
