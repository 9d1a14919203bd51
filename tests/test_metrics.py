"""/metrics exposes the histograms operators chart, with real observations."""

from __future__ import annotations

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
    await client.post("/generate", json={"prompt": "Hello", "max_tokens": 4, "stream": True})
    await client.post("/generate", json={"prompt": "Hello", "max_tokens": 4})
    await client.post("/classify", json={"inputs": ["hi", "refund please"], "labels": ["billing", "greeting"]})
    await client.post("/generate", json={"prompt": ""})
    text = (await client.get("/metrics")).text
    assert sample(text, "http_request_duration_seconds_count", '{endpoint="/generate"}') >= 2
    assert sample(text, "http_request_duration_seconds_count", '{endpoint="/classify"}') >= 1
    assert sample(text, "http_requests_total", '{endpoint="/generate",status="200"}') >= 2
    assert sample(text, "http_requests_total", '{endpoint="/generate",status="422"}') >= 1
    assert sample(text, "llm_time_to_first_token_seconds_count") >= 2
    assert sample(text, "llm_inter_token_latency_seconds_count") >= 6
    assert sample(text, "llm_generated_tokens_total") >= 8
    assert sample(text, "llm_prompt_tokens_total") >= 2
    assert sample(text, "llm_batch_size_count", '{endpoint="generate"}') >= 8
    assert sample(text, "llm_batch_size_count", '{endpoint="classify"}') >= 1
    assert sample(text, "llm_queue_time_seconds_count", '{endpoint="classify"}') >= 2
    assert sample(text, "llm_queue_time_seconds_count", '{endpoint="generate"}') >= 2
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
