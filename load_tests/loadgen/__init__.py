"""Load generator: closed-loop (fixed concurrency) and open-loop (Poisson) traffic over HTTP.

Measures what a user of a streaming LLM API feels (latency, time to first token, inter-token
latency) and what an operator pays for (throughput, errors by status), for our server's
``/generate`` and ``/classify`` and for any OpenAI-compatible server, so peers can be measured
with the same tool.

Python API (one call runs a whole sweep and returns per-level summaries)::

    from load_tests.loadgen import make_scenario, run_sweep_sync
    result = run_sweep_sync("http://127.0.0.1:8000", make_scenario("generate-stream", max_tokens=16),
                            concurrencies=[1, 4], requests=20, duration=30)
    summary = result.levels[0].summary          # LevelSummary: ok, errors, latency_ms["p50"], ...

CLI: ``python -m load_tests.loadgen --help``.

Safety: only loopback targets unless ``allow_remote``; every level is bounded by a request count
*and* a duration, and every request by a timeout.

Modules, by concern: ``prompts`` (what to ask), ``scenarios`` (request bodies and response parsing
per endpoint), ``sse`` (stream decoding), ``targets`` (which servers may be loaded), ``runner``
(sending requests, levels, sweeps), ``results`` (records, summaries, the results document),
``cli``; ``load_tests.report`` renders results as markdown and plots.
"""

from load_tests.loadgen.prompts import BUILTIN_PROMPTS, Message, PromptItem, as_messages, as_text, load_prompts
from load_tests.loadgen.results import (
    SCHEMA_VERSION,
    LevelResult,
    LevelSummary,
    RequestRecord,
    SweepResult,
    environment_info,
    percentile,
    summarize,
)
from load_tests.loadgen.runner import (
    CONNECTIONS_PER_CLIENT,
    IncompleteStream,
    StreamError,
    arrival_offsets,
    make_client,
    make_clients,
    run_level,
    run_sweep,
    run_sweep_sync,
    send_request,
)
from load_tests.loadgen.scenarios import DEFAULT_LABELS, SCENARIO_NAMES, BadResponse, Scenario, make_scenario
from load_tests.loadgen.sse import SSEDecoder, SSEEvent, StreamEvent, parse_generate_event, parse_openai_event
from load_tests.loadgen.targets import TargetRefused, check_target, is_loopback_host, resolve_url

__all__ = [
    "BUILTIN_PROMPTS",
    "CONNECTIONS_PER_CLIENT",
    "DEFAULT_LABELS",
    "SCENARIO_NAMES",
    "SCHEMA_VERSION",
    "BadResponse",
    "IncompleteStream",
    "LevelResult",
    "LevelSummary",
    "Message",
    "PromptItem",
    "RequestRecord",
    "SSEDecoder",
    "SSEEvent",
    "Scenario",
    "StreamError",
    "StreamEvent",
    "SweepResult",
    "TargetRefused",
    "arrival_offsets",
    "as_messages",
    "as_text",
    "check_target",
    "environment_info",
    "is_loopback_host",
    "load_prompts",
    "make_client",
    "make_clients",
    "make_scenario",
    "parse_generate_event",
    "parse_openai_event",
    "percentile",
    "resolve_url",
    "run_level",
    "run_sweep",
    "run_sweep_sync",
    "send_request",
    "summarize",
]
