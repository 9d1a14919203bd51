"""Settings to engine configuration, without building an engine."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.hardware import HardwarePolicy
from server.runtime import engine_config

pytestmark = pytest.mark.unit


def policy(device: str, compiled: bool = False) -> HardwarePolicy:
    return HardwarePolicy(
        device=device,
        dtype="float32",
        gen_quantize="none",
        gen_prune=0.0,
        cls_quantize="none",
        prefill_budget=512,
        compile_decode=compiled,
        engine_core="thread",
        api_servers=1,
        why={},
    )


def test_compiled_decode_is_the_hardware_policys() -> None:
    """The policy decides (tests/test_hardware.py: 'auto', explicit values, CUDA); the engine follows it."""
    assert engine_config(Settings(), policy("cpu")).compile_decode is False
    assert engine_config(Settings(), policy("cpu", compiled=True)).compile_decode is True
