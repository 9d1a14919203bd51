"""Settings to engine configuration, without building an engine."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.hardware import CompileDecode, HardwarePolicy
from server.runtime import engine_config

pytestmark = pytest.mark.unit


def policy(device: str, compiled: CompileDecode = "off") -> HardwarePolicy:
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
    config = engine_config(Settings(), policy("cpu"))
    assert (config.compile_decode, config.compile_background) == (False, False)
    config = engine_config(Settings(), policy("cpu", compiled="before_ready"))
    assert (config.compile_decode, config.compile_background) == (True, False)
    config = engine_config(Settings(), policy("cpu", compiled="background"))
    assert (config.compile_decode, config.compile_background) == (True, True)
