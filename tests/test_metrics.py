"""/metrics exposes the histograms operators chart, with real observations."""

from __future__ import annotations

import json
import re
from importlib.metadata import version

import httpx
import pytest

from server.runtime import Runtime

pytestmark = pytest.mark.integration


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} missing from /metrics"
    return float(match.group(1))


async def test_metrics_after_traffic(client: httpx.AsyncClient) -> None:
    """Counts move by exactly this test's own traffic (other tests share the registry, and how many tokens
    the model writes before an end of sequence depends on the CPU's rounding: the responses say it)."""
    counted = (
        ("http_request_duration_seconds_count", '{endpoint="/generate"}'),
        ("http_request_duration_seconds_count", '{endpoint="/classify"}'),
        ("http_requests_total", '{endpoint="/generate",status="200"}'),
        ("http_requests_total", '{endpoint="/generate",status="422"}'),
        ("llm_time_to_first_token_seconds_count", ""),
        ("llm_inter_token_latency_seconds_count", ""),
        ("llm_generated_tokens_total", ""),
        ("llm_batch_size_count", '{endpoint="generate"}'),
        ("llm_batch_size_count", '{endpoint="classify"}'),
        ("llm_queue_time_seconds_count", '{endpoint="classify"}'),
        ("llm_queue_time_seconds_count", '{endpoint="generate"}'),
    )
    before_text = (await client.get("/metrics")).text
    before = {key: sample(before_text, *key) if key[0] + key[1] in before_text else 0.0 for key in counted}
    stream = {"prompt": "Hello", "max_tokens": 4, "stream": True, "logprobs": True}  # each event lists its tokens
    streamed = await client.post("/generate", json=stream)
    events = [json.loads(line[len("data: ") :]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    whole = (await client.post("/generate", json={"prompt": "Hello", "max_tokens": 4})).json()
    await client.post("/classify", json={"inputs": ["hi", "refund please"], "labels": ["billing", "greeting"]})
    await client.post("/generate", json={"prompt": ""})
    text = (await client.get("/metrics")).text
    delta = {key: sample(text, *key) - before[key] for key in counted}
    tokens = events[-1]["usage"]["completion_tokens"] + whole["usage"]["completion_tokens"]
    # Inter-token latency: one observation per streamed event with tokens after the first; one for a whole
    # response of two or more tokens.
    gaps = sum(1 for e in events if e["logprobs"]) - 1 + (whole["usage"]["completion_tokens"] > 1)
    assert sum(len(e["logprobs"]) for e in events) == events[-1]["usage"]["completion_tokens"]
    assert delta[("http_request_duration_seconds_count", '{endpoint="/generate"}')] == 3
    assert delta[("http_request_duration_seconds_count", '{endpoint="/classify"}')] == 1
    assert delta[("http_requests_total", '{endpoint="/generate",status="200"}')] == 2
    assert delta[("http_requests_total", '{endpoint="/generate",status="422"}')] == 1
    assert delta[("llm_time_to_first_token_seconds_count", "")] == 2
    assert delta[("llm_inter_token_latency_seconds_count", "")] == gaps
    assert delta[("llm_generated_tokens_total", "")] == tokens
    assert delta[("llm_batch_size_count", '{endpoint="generate"}')] >= max(events[-1]["usage"]["completion_tokens"], 2)
    assert delta[("llm_batch_size_count", '{endpoint="classify"}')] >= 1
    assert delta[("llm_queue_time_seconds_count", '{endpoint="classify"}')] == 2
    assert delta[("llm_queue_time_seconds_count", '{endpoint="generate"}')] == 2
    assert sample(text, "llm_prompt_tokens_total") >= 2
    # Buckets resolve milliseconds.
    assert 'http_request_duration_seconds_bucket{endpoint="/generate",le="0.001"}' in text
    assert sample(text, "http_requests_in_flight", '{endpoint="/generate"}') == 0
    assert sample(text, "llm_running_sequences") == 0
    assert sample(text, "llm_kv_cache_usage_ratio") == 0


async def test_startup_build_and_kv_metrics(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await client.post("/generate", json={"prompt": "Hello", "max_tokens": 2})
    text = (await client.get("/metrics")).text
    assert sample(text, "llm_ready") == 1
    for model in ("generate", "classify"):
        assert sample(text, "llm_model_load_seconds", f'{{model="{model}"}}') > 0
        assert sample(text, "llm_warmup_seconds", f'{{model="{model}"}}') > 0
    build = re.search(r"^llm_build_info\{(.*)\} 1\.0$", text, re.MULTILINE)
    assert build, "llm_build_info missing"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', build.group(1)))
    assert labels["version"] == version("lowlat-server")
    assert (labels["device"], labels["dtype"]) == (runtime.served.policy.device, runtime.served.policy.dtype)
    assert labels["gen_model"] and labels["cls_model"]
    # The block gauges agree with the usage ratio; the pool has a size.
    used = sample(text, "llm_kv_cache_blocks", '{state="used"}')
    free = sample(text, "llm_kv_cache_blocks", '{state="free"}')
    assert free > 0 and used == round(sample(text, "llm_kv_cache_usage_ratio") * (used + free))
    assert sample(text, "llm_kv_cache_bytes") > 0
