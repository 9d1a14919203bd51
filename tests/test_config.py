"""Settings come from CLI flags and LLM_* environment variables, and reject inconsistent limits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.config import Settings

pytestmark = pytest.mark.unit


def test_cli_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PORT", "9001")
    monkeypatch.setenv("LLM_CLS_MAX_WAIT_MS", "2.5")
    s = Settings(_cli_parse_args=["--gen-model", "dummy:smollm2-135m", "--max-num-seqs", "4", "--no-enable-classify"])
    assert (s.gen_model, s.max_num_seqs, s.enable_classify) == ("dummy:smollm2-135m", 4, False)
    assert (s.port, s.cls_max_wait_ms) == (9001, 2.5)


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
