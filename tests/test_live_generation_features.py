"""Timings, logprobs and structured output over real sockets, in both process layouts (engine thread, and
engine core + API servers, where timings and logprobs cross the msgspec frames)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.test_generate_api import parse_sse

pytestmark = pytest.mark.live

SCHEMA = {
    "type": "object",
    "properties": {"intent": {"enum": ["refund", "shipping", "other"]}, "urgent": {"type": "boolean"}},
    "required": ["intent", "urgent"],
    "additionalProperties": False,
}


def test_timings_logprobs_and_schema_across_layouts(live_server: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "My parcel is late, classify it."}],
        "json_schema": SCHEMA,
        "max_tokens": 40,
        "logprobs": True,
        "top_logprobs": 2,
        "timings": True,
    }
    r = httpx.post(f"{live_server}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert len(out["logprobs"]) == out["usage"]["completion_tokens"] - 1  # all but the end of sequence
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in out["logprobs"])
    t = out["timings"]
    assert t["queue_ms"] >= 0 and t["prefill_ms"] > 0 and t["decode_ms"] > 0 and t["tokens_per_second"] > 0
    assert t["total_ms"] >= t["queue_ms"] + t["prefill_ms"] + t["decode_ms"] - 1  # rounding
    assert float(r.headers["x-prefill-time-ms"]) == pytest.approx(t["prefill_ms"], abs=0.01)
    streamed = parse_sse(httpx.post(f"{live_server}/generate", json={**body, "stream": True}, timeout=60).text)
    assert "".join(e["text"] for e in streamed) == out["text"]
    # The streamed request finds its prompt prefix-cached and prefills only the tail, in a GEMM of another shape:
    # the same tokens, log-probabilities equal to rounding (load_tests/results/speculative/exact-b1/README.md).
    streamed_logprobs = [e for event in streamed for e in event["logprobs"]]
    assert _tokens(streamed_logprobs) == _tokens(out["logprobs"])
    assert _values(streamed_logprobs) == pytest.approx(_values(out["logprobs"]), abs=1e-3)
    assert streamed[-1]["timings"]["decode_ms"] > 0


def _tokens(entries: list[dict]) -> list[tuple]:
    return [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]]) for e in entries]


def _values(entries: list[dict]) -> list[float]:
    return [v for e in entries for v in (e["logprob"], *(t["logprob"] for t in e["top_logprobs"]))]
