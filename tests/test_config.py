"""Settings come from CLI flags and LLM_* environment variables, grouped by concern in the code and in
``--help`` with flat names, and reject inconsistent limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# Every setting that deployments may set (LLM_<NAME>, --<name>): renaming one breaks them.
NAMES = (
    "gen_model", "cls_model", "tokenizer", "enable_generate", "enable_classify", "device", "dtype", "cache_dir",
    "gen_quantize", "gen_prune", "cls_quantize", "cls_prune", "compress_cache", "host", "port", "log_level",
    "api_servers", "engine_core", "data_parallel_size", "engine_hang_timeout_s", "max_input_tokens",
    "max_new_tokens", "default_max_tokens", "max_num_seqs", "max_batched_tokens", "kv_cache_tokens",
    "kv_block_size", "enable_prefix_caching", "cls_max_batch_size", "cls_max_batch_tokens", "cls_max_wait_ms",
    "cls_max_inputs", "cls_max_input_tokens", "cls_cache_size", "max_queued_requests", "max_admitted_tokens",
    "max_concurrent_streams", "cls_max_queued_inputs", "request_timeout_s", "max_body_bytes",
    "header_read_timeout_s", "body_read_timeout_s", "shutdown_grace_s", "api_keys", "api_keys_file",
    "public_probes", "share_prefix_cache_across_keys", "cors_origins", "log_prompts",
)  # fmt: skip


def test_cli_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PORT", "9001")
    monkeypatch.setenv("LLM_CLS_MAX_WAIT_MS", "2.5")
    s = Settings.from_cli(["--gen-model", "dummy:smollm2-135m", "--max-num-seqs", "4", "--no-enable-classify"])
    assert (s.gen_model, s.max_num_seqs, s.enable_classify) == ("dummy:smollm2-135m", 4, False)
    assert (s.port, s.cls_max_wait_ms) == (9001, 2.5)


def test_names_stay_flat_and_stable() -> None:
    """Grouping by concern changed no name: every known setting is still a top-level field, and every
    LLM_<NAME> the deployment files, docs, scripts and benchmarks use is one."""
    assert set(NAMES) <= set(Settings.model_fields)
    files = [ROOT / "Dockerfile", ROOT / "docker-compose.yml", ROOT / "README.md", *ROOT.glob("scripts/*")]
    files += [*ROOT.glob("load_tests/**/*.py"), *ROOT.glob("load_tests/**/*.sh"), *ROOT.glob("tests/*.py")]
    used = {m.lower() for f in files if f.is_file() for m in re.findall(r"\bLLM_([A-Z0-9_]+)", f.read_text())}
    assert used and used <= set(Settings.model_fields)


def test_help_lists_every_flag_under_its_concern(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_cli(["--help"])
    help_text = capsys.readouterr().out
    headings = re.findall(r"^(\S[^\n]*):\n", help_text, re.MULTILINE)
    concerns = list(reversed(Settings.__bases__[1:]))
    assert headings == ["options", *(c.model_config["title"] for c in concerns)]
    sections = re.split(r"^\S[^\n]*:\n", help_text, flags=re.MULTILINE)[2:]  # after usage and options
    for concern, section in zip(concerns, sections, strict=True):
        flags = set(re.findall(r"^  (--[a-z0-9-]+)", section, re.MULTILINE))
        assert flags == {"--" + name.replace("_", "-") for name in concern.model_fields}, concern.__name__
    assert sum(len(c.model_fields) for c in concerns) == len(Settings.model_fields)


@pytest.mark.parametrize(
    "bad",
    [
        {"default_max_tokens": 600, "max_new_tokens": 512},
        {"kv_cache_tokens": 1024},
        {"port": 0},
        {"device": "tpu"},
        {"no_such_setting": 1},
        {"engine_core": "thread", "api_servers": 2},
        {"cls_max_inputs": 2000},
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


def test_a_draft_model_goes_with_draft_speculation_or_none() -> None:
    """ngram with a draft model would load a model it never uses: refused, naming the setting."""
    with pytest.raises(ValueError, match="draft_model"):
        Settings(speculative="ngram", draft_model="dummy:smollm2-135m")
    assert Settings(speculative="none", draft_model="dummy:smollm2-135m").draft_model == "dummy:smollm2-135m"
