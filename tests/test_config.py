"""Settings come from CLI flags and LLM_* environment variables, and reject inconsistent limits."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from models import quant_kernels
from server.config import Settings

pytestmark = pytest.mark.unit


def test_cli_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PORT", "9001")
    monkeypatch.setenv("LLM_CLS_MAX_WAIT_MS", "2.5")
    s = Settings(_cli_parse_args=["--gen-model", "dummy:smollm2-135m", "--max-num-seqs", "4", "--no-enable-classify"])
    assert (s.gen_model, s.max_num_seqs, s.enable_classify) == ("dummy:smollm2-135m", 4, False)
    assert (s.port, s.cls_max_wait_ms) == (9001, 2.5)


def test_cpu_defaults() -> None:
    s = Settings(device="cpu")
    assert s.torch_device() == torch.device("cpu")
    assert s.torch_dtype() == torch.float32
    assert s.prefill_budget() == 512 and Settings(device="cpu", max_batched_tokens=64).prefill_budget() == 64


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
    s = Settings(max_num_seqs=max_num_seqs)
    monkeypatch.setattr(Settings, "torch_device", lambda self: torch.device(device))
    monkeypatch.setattr(quant_kernels, "usable", lambda device, dtype: kernel)
    assert (s.quantize_method("gen"), s.quantize_method("cls")) == (gen, cls)
    explicit = Settings(max_num_seqs=max_num_seqs, gen_quantize="fp8", cls_quantize="int8-wo")
    assert (explicit.quantize_method("gen"), explicit.quantize_method("cls")) == ("fp8", "int8-wo")


@pytest.mark.parametrize(
    "bad",
    [
        {"default_max_tokens": 600, "max_new_tokens": 512},
        {"kv_cache_tokens": 1024},
        {"port": 0},
        {"device": "tpu"},
        {"no_such_setting": 1},
    ],
)
def test_rejects_inconsistent_settings(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_version_of_a_source_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Running from a checkout that was never pip-installed must not break startup (seen on the GPU host)."""
    from importlib.metadata import PackageNotFoundError

    from server import runtime

    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(runtime, "version", missing)
    assert runtime._package_version() == "unknown"
