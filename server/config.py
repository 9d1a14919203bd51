"""One settings object for the whole server: every field is an environment variable (``LLM_<NAME>``) and
a CLI flag (``--<name>`` in kebab case; ``python -m server --help``).

Fields are declared by concern, one class each; :class:`Settings` joins them flat, so
names stay one level deep (``settings.max_num_seqs``, ``LLM_MAX_NUM_SEQS``, ``--max-num-seqs``) and
``--help`` lists them under one heading per concern. What ``auto`` values resolve to on this machine is
not decided here but in server/hardware.py.
"""

from __future__ import annotations

import inspect
from argparse import ArgumentParser
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

# The largest pruning share that kept the default within +5% perplexity / >= 99% label agreement (none for
# classification): load_tests/results/compression/README.md#decisions. Generation's is per device
# (server/hardware.py).
DEFAULT_CLS_PRUNE = 0.0
MAX_API_SERVERS = 64  # bounds the setting and the default server/hardware.py derives

Quantization = Literal["auto", "none", "int8", "int8-wo", "fp8"]
# The bounds most settings share, named once.
Count = Annotated[int, Field(ge=1)]  # things, tokens, processes: at least one
Size = Annotated[int, Field(ge=0)]  # a capacity that may be 0 (none)
Seconds = Annotated[float, Field(gt=0)]  # a timeout
Share = Annotated[float, Field(ge=0.0, lt=1.0)]  # a fraction of channels


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lowlat-server"


class Concern(BaseModel, use_attribute_docstrings=True):
    """A group of settings with one ``--help`` heading (its ``title``); each field's docstring is its help."""


class ModelSettings(Concern, title="models"):
    """What to serve, on which device and in what precision ('auto': see /info)."""

    gen_model: str = "default"
    """generation model: 'default' (embedded SmolLM2), a HF dir, a .gguf file, 'dummy:<preset>'"""
    cls_model: str = "default"
    """classification model: 'default' (embedded MiniLM), a HF dir, or 'dummy:minilm-l6'"""
    tokenizer: str | None = None
    """tokenizer directory overriding the model's (dummy models)"""
    enable_generate: bool = True
    """load the generation model and serve /generate"""
    enable_classify: bool = True
    """load the classification model and serve /classify"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """'auto' picks CUDA when available"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """'auto': bfloat16 on CUDA, float32 on CPU"""
    cache_dir: Path = Field(default_factory=default_cache_dir)
    """converted-model cache directory"""


class CompressionSettings(Concern, title="compression"):
    """Quantization and pruning at startup (models/compress.py); the defaults were chosen from
    load_tests/results/compression/."""

    gen_quantize: Quantization = "auto"
    """generation weights: 'auto' = int8 on CPU; on CUDA int8-wo while max_num_seqs is small, else none (what
    it chose is logged at startup and shown at /info)"""
    gen_prune: Share | None = None
    """share of MLP channels pruned (generation); unset: 0.5% on CPU, 1% on CUDA (shown at /info)"""
    cls_quantize: Quantization = "auto"
    """classification weights: 'auto' = none (float) on CPU and CUDA (see /info for why)"""
    cls_prune: Share = DEFAULT_CLS_PRUNE
    """share of MLP channels pruned (classify)"""
    compress_cache: bool = True
    """cache compressed weights in cache_dir (restart skips the work)"""


class HTTPSettings(Concern, title="HTTP"):
    """Where the API listens."""

    host: str = "127.0.0.1"
    """bind address (the container sets 0.0.0.0)"""
    port: Annotated[Count, Field(le=65535)] = 8000
    """TCP port (every API server shares it)"""


class ProcessSettings(Concern, title="processes"):
    """API servers (HTTP, tokenization, detokenization) and the engines, in one process or several."""

    api_servers: Annotated[Count, Field(le=MAX_API_SERVERS)] | None = None
    """HTTP processes sharing the port; default 1 on up to 4 usable CPU cores, else half of them (at most 8 per
    engine core, 64 in all)"""
    engine_core: Literal["auto", "thread", "process"] = "auto"
    """where the engines run: 'process' = an engine-core process per device, 'thread' = in the (single) API
    server's process; 'auto' = process on CUDA, with several API servers or data parallel"""
    data_parallel_size: Annotated[Count, Field(le=64)] = 1
    """engine cores, one per GPU (engine_core=process)"""
    tensor_parallel_size: Annotated[Count, Field(le=8)] = 1
    """GPUs per engine core, splitting attention heads and MLP channels (NCCL; a worker process per GPU after
    the first); with data parallel, core i takes GPUs i*N to i*N+N-1"""
    tensor_parallel_all_reduce: Literal["auto", "nccl"] = "auto"
    """how tensor-parallel ranks sum their partial products: auto = a one-shot kernel over CUDA symmetric memory
    (torch; peer loads over NVLink, no multicast) up to 8 MiB, such as decode steps, NCCL beyond it and wherever
    symmetric memory cannot be set up; nccl = NCCL always"""
    engine_hang_timeout_s: Seconds = 120.0
    """an engine core that has work and sends nothing for this long is killed, ending the server (exit 1) for
    its orchestrator to restart; longer than the slowest step"""

    @model_validator(mode="after")
    def _one_process(self) -> ProcessSettings:
        if self.engine_core == "thread" and ((self.api_servers or 1) > 1 or self.data_parallel_size > 1):
            raise ValueError("engine_core=thread runs one API server and one engine: drop api_servers/data_parallel")
        return self


class GenerationSettings(Concern, title="generation limits and batching"):
    """Generation limits and continuous batching."""

    max_input_tokens: Count = 2048
    """longest accepted prompt, in tokens"""
    max_new_tokens: Count = 512
    """largest accepted max_tokens"""
    default_max_tokens: Count = 128
    """max_tokens when the request gives none"""
    max_num_seqs: Count = 16
    """sequences in the running batch"""
    max_batched_tokens: Annotated[int, Field(ge=16)] | None = None
    """padded prompt tokens per prefill step, longer prompts run in chunks; default 512 on CPU, 4096 on CUDA"""
    kv_cache_tokens: Annotated[int, Field(ge=256)] = 32768
    """KV-cache capacity in tokens, all sequences together"""
    kv_block_size: Count = 16
    """tokens per KV-cache block"""
    enable_prefix_caching: bool = True
    """reuse the KV cache of shared prompt prefixes (full blocks) across requests"""
    compile_decode: Literal["auto", "on", "off"] = "auto"
    """run decode steps as torch.compile graphs (fused kernels: faster steps; a fresh start compiles for ~1 minute
    on a GPU host, minutes on a small CPU; later starts reuse cache_dir/inductor); on = compile before /ready;
    auto = on with CUDA and Triton, on CPU (with a C++ compiler) compile after /ready in the background, serving
    eager steps until each batch size's graph is in"""
    cpu_threads: Count | None = None
    """torch threads on CPU; default: one per physical core this process may use"""

    @model_validator(mode="after")
    def _limits_fit(self) -> GenerationSettings:
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError("default_max_tokens must not exceed max_new_tokens")
        if self.max_input_tokens + self.max_new_tokens > self.kv_cache_tokens:
            raise ValueError("kv_cache_tokens must hold at least one max_input_tokens + max_new_tokens sequence")
        return self


class SpeculativeSettings(Concern, title="speculative decoding"):
    """Speculative decoding (engine/speculative.py): proposed tokens verified by the model in one step."""

    speculative: Literal["none", "ngram", "draft"] = "none"
    """what requests that do not say (their `speculative` field) get: 'ngram' = prompt lookup, 'draft' =
    draft_model proposes; 'none' = only requests that ask (with draft_model if given, else prompt lookup)"""
    speculative_tokens: Annotated[Count, Field(le=16)] = 4
    """draft tokens proposed per sequence and step, at most"""
    draft_model: str | None = None
    """a smaller generation model with the same tokenizer proposing drafts (a spec as gen_model), uncompressed"""

    @model_validator(mode="after")
    def _draft_given(self) -> SpeculativeSettings:
        if self.speculative == "draft" and self.draft_model is None:
            raise ValueError("speculative=draft needs draft_model")
        if self.speculative == "ngram" and self.draft_model is not None:
            raise ValueError("draft_model is for speculative=draft (or none: requests that ask get the draft model)")
        return self


class ClassificationSettings(Concern, title="classification"):
    """Classification: per-call limits, dynamic batching, the response cache."""

    cls_max_batch_size: Count = 32
    """inputs per classification batch"""
    cls_max_batch_tokens: Count = 8192
    """tokens per classification batch"""
    cls_max_wait_ms: Annotated[float, Field(ge=0)] = 0.0
    """longest wait for a batch to fill; 0 = none: a batch runs as soon as the device is free, and what
    arrives meanwhile forms the next one"""
    cls_max_inputs: Count = 64
    """inputs accepted in one /classify call"""
    cls_max_input_tokens: Count = 512
    """longest accepted classification input, in tokens"""
    cls_cache_size: Size = 4096
    """classification results kept in an LRU cache for identical inputs; 0 disables it"""


class OverloadSettings(Concern, title="overload, deadlines, shutdown"):
    """Overload (429), deadlines and slow clients, graceful shutdown."""

    max_queued_requests: Size = 64
    """generate requests waiting beyond the running batch; more are refused with 429"""
    max_admitted_tokens: Count | None = None
    """prompt + max_tokens of all admitted generation sequences together, per engine core; more get 429, one
    request over it 400; default twice kv_cache_tokens (a full cache running, as much waiting)"""
    max_concurrent_streams: Count = 64
    """streamed responses open at once; more get 429"""
    cls_max_queued_inputs: Count = 1024
    """classification inputs waiting; more get 429"""
    request_timeout_s: Seconds = 120.0
    """deadline per request (504); X-Request-Timeout may ask for less"""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    """largest accepted request body (413)"""
    header_read_timeout_s: Seconds = 10.0
    """a connection that has not sent a request's complete headers by then is closed"""
    body_read_timeout_s: Seconds = 30.0
    """a request body not all received by then (after its headers) gets 408, connection closed"""
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 30.0
    """on SIGTERM, how long in-flight requests may take to finish before exit"""


class AccessSettings(Concern, title="security and access"):
    """Who may call the API."""

    api_keys: list[SecretStr] = []
    """accepted Bearer API keys; none means no authentication"""
    api_keys_file: Path | None = None
    """file with one accepted API key per line (adds to api_keys)"""
    public_probes: bool = True
    """/health, /ready and /metrics answer without an API key"""
    share_prefix_cache_across_keys: bool = False
    """with API keys, requests made with different keys reuse each other's cached prompt prefixes"""
    cors_origins: list[str] = []
    """origins allowed by CORS; empty disables CORS"""

    def accepted_keys(self) -> list[bytes]:
        """API keys from ``api_keys`` and ``api_keys_file`` (blank lines and ``#`` comments skipped)."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return [k.encode() for k in keys if k]


class ObservabilitySettings(Concern, title="observability"):
    """Logs (metrics are always on: GET /metrics)."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """of every process's logs"""
    log_prompts: bool = False
    """log prompt text (off: logs carry only sizes and request ids)"""


class Settings(  # pydantic collects fields from the last base first: the concerns are listed bottom up
    BaseSettings,
    ObservabilitySettings,
    AccessSettings,
    OverloadSettings,
    ClassificationSettings,
    SpeculativeSettings,
    GenerationSettings,
    ProcessSettings,
    HTTPSettings,
    CompressionSettings,
    ModelSettings,
):
    """Every setting is an environment variable LLM_<NAME> and a flag --<name>; a flag wins."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_",
        cli_prog_name="python -m server",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.cls_max_inputs > self.cls_max_queued_inputs:
            raise ValueError("cls_max_queued_inputs must be at least cls_max_inputs (one full call must fit)")
        return self

    @classmethod
    def from_cli(cls, args: list[str]) -> Settings:
        """Settings from CLI ``args`` over ``LLM_*`` environment variables and defaults; ``--help`` lists
        the flags under one heading per concern."""
        groups: dict[str, Any] = {}  # field name -> its concern's argparse group

        def add_argument(parser: ArgumentParser, *names: str, **kwargs: Any) -> Any:
            if not groups:  # first call: one heading per concern, models first
                for concern in reversed(cls.__bases__[1:]):
                    doc = inspect.cleandoc(concern.__doc__ or "")
                    group = parser.add_argument_group(concern.model_config.get("title"), doc)
                    groups.update(dict.fromkeys(concern.model_fields, group))
            return groups.get(kwargs.get("dest", ""), parser).add_argument(*names, **kwargs)

        source = CliSettingsSource(cls, add_argument_method=add_argument)
        return cls(_cli_settings_source=source(args=args))
