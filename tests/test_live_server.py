"""Against a real ``python -m server`` process on loopback: real sockets, SSE framing, disconnects."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import httpx
import pytest

from load_tests.loadgen import make_scenario, run_sweep_sync
from load_tests.report import write_report
from tests.conftest import eventually

pytestmark = pytest.mark.live


def gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


STEPS = 'llm_batch_size_sum{endpoint="generate"}'  # sequence-steps the engine ran
# A chat prompt that really streams many tokens (a raw prompt may end after one).
LONG = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 64}


def wait_idle(url: str) -> None:
    eventually(lambda: gauge(url, "llm_running_sequences") == 0, 10, "no running sequence")
    assert gauge(url, "llm_kv_cache_usage_ratio") == 0


def test_generate_and_classify_over_http(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        assert c.get("/ready").status_code == 200
        chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}
        whole = c.post("/generate", json=chat).json()
        assert whole["text"].strip() and whole["finish_reason"] in ("stop", "length")
        events = []
        with c.stream("POST", "/generate", json={**chat, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert "".join(e["text"] for e in events) == whole["text"]
        assert events[-1]["usage"] == whole["usage"]
        r = c.post("/classify", json={"inputs": ["refund my money"], "labels": ["billing question", "weather"]})
        assert r.json()["results"][0]["label"] == "billing question"


def test_disconnected_stream_frees_its_slot(live_server: str) -> None:
    steps = gauge(live_server, STEPS)
    with (
        httpx.Client(base_url=live_server, timeout=60) as c,
        c.stream("POST", "/generate", json={**LONG, "stream": True}) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # first token arrived: now hang up mid-generation
    wait_idle(live_server)
    assert gauge(live_server, STEPS) - steps < LONG["max_tokens"]  # aborted, not run to completion


def test_disconnected_whole_request_frees_its_slot(live_server: str) -> None:
    steps = gauge(live_server, STEPS)
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(f"{live_server}/generate", json=LONG, timeout=0.5)
    wait_idle(live_server)
    assert gauge(live_server, STEPS) - steps < LONG["max_tokens"]


def test_load_generator_against_real_server(live_server: str, tmp_path: Path) -> None:
    result = run_sweep_sync(
        live_server,
        make_scenario("generate-stream", max_tokens=8),
        concurrencies=[1, 4],
        requests=8,
        duration=60,
        timeout=60,
    )
    assert [lv.summary.concurrency for lv in result.levels] == [1, 4]
    for level in result.levels:
        s = level.summary
        assert s.requests == 8 and s.ok == 8 and not s.errors
        assert s.ttft_ms["p50"] is not None and s.ttft_ms["p50"] > 0
        assert s.latency_ms["p99"] >= s.latency_ms["p50"] > 0
        assert s.output_tokens_per_s > 0
    written = write_report(result, tmp_path)
    doc = json.loads(written["json"].read_text())
    assert [lv["ok"] for lv in doc["levels"]] == [8, 8] and doc["environment"]["target"] == live_server
    assert written["markdown"].read_text().count("| c=") == 2
    for plot in ("latency_plot", "ttft_plot"):
        assert written[plot].read_bytes().startswith(b"\x89PNG")
    classify = run_sweep_sync(
        live_server, make_scenario("classify", labels=["billing", "shipping"]), concurrencies=[8], requests=16
    )
    assert classify.levels[0].summary.ok == 16
