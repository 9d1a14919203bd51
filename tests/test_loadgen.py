"""The load generator (load_tests/loadgen/) without a server: parsing, statistics, scenarios, reports,
and its scheduling, counting and bounding logic.

Loop-mechanics tests use ``httpx.MockTransport`` with handlers that answer after an ``asyncio.sleep`` on
a virtual-clock event loop (tests/virtual_clock.py): no real time passes, and since the generator
measures with the loop's clock, every latency, TTFT and level duration is exact. Real sockets through
the CLI: test_loadgen_cli.py; against the real server: test_live_server.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from load_tests import loadgen, report
from load_tests.loadgen import (
    RequestRecord,
    SSEDecoder,
    SSEEvent,
    TargetRefused,
    arrival_offsets,
    check_target,
    cli,
    make_scenario,
    parse_generate_event,
    parse_openai_event,
    percentile,
    run_level,
    run_sweep,
    summarize,
)
from load_tests.soak import tree_rss
from tests.virtual_clock import run_virtual

pytestmark = pytest.mark.unit

BASE = "http://127.0.0.1:8000"

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def _run_level(handler: Handler, scenario_name: str = "generate", base: str = BASE, **kw: Any):
    """Run one level over a MockTransport (in-process: no sockets)."""

    async def go():
        async with httpx.AsyncClient(base_url=base, transport=httpx.MockTransport(handler)) as client:
            return await run_level(client, make_scenario(scenario_name), **kw)

    return run_virtual(go())


class Tracker:
    """Handler answering /generate after a delay, recording peak concurrency and call count."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.calls = 0
        self.active = 0
        self.peak = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        return httpx.Response(
            200,
            json={
                "text": "ok",
                "finish_reason": "stop",
                "usage": {"prompt_tokens": 3, "completion_tokens": 5},
            },
        )


def _sse(*payloads: dict[str, Any] | str) -> list[bytes]:
    return [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode() for p in payloads]


def _stream_response(chunks: list[bytes], gap: float) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for c in chunks:
            await asyncio.sleep(gap)
            yield c

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


# ------------------------------------------------------------------------------ percentiles


def test_percentile_hand_computed_linear_interpolation() -> None:
    data = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4; position = 3 * q / 100
    assert percentile(data, 0) == 1.0
    assert percentile(data, 50) == pytest.approx(2.5)  # pos 1.5
    assert percentile(data, 90) == pytest.approx(3.7)  # pos 2.7 -> 3 + 0.7
    assert percentile(data, 99) == pytest.approx(3.97)  # pos 2.97
    assert percentile(data, 100) == 4.0
    assert percentile([10.0, 20.0], 25) == pytest.approx(12.5)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_matches_numpy_default() -> None:
    np = pytest.importorskip("numpy")
    import random

    rng = random.Random(1)
    for n in (1, 2, 5, 17, 100):
        data = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


# ------------------------------------------------------------------------------ SSE parsing


def test_sse_decoder_lines_generate_format() -> None:
    lines = [
        ": keep-alive comment",
        'data: {"text": "Hel"}',
        "",
        'data: {"text": "lo"}\r',  # CRLF leftovers are tolerated
        "",
        "",  # extra blank line dispatches nothing
        "event: message",
        'data: {"text": "!", "finish_reason": "stop",',
        'data:  "usage": {"prompt_tokens": 4, "completion_tokens": 3}}',
        "",
    ]
    dec = SSEDecoder()
    events = [ev for line in lines if (ev := dec.feed_line(line)) is not None]
    assert len(events) == 3
    parsed = [parse_generate_event(ev) for ev in events]
    assert [p.text for p in parsed] == ["Hel", "lo", "!"]
    assert [p.done for p in parsed] == [False, False, True]
    assert parsed[2].finish_reason == "stop" and parsed[2].completion_tokens == 3


def test_sse_decoder_bytes_split_anywhere_and_unicode_separators() -> None:
    payload = {"text": "a\u2028b ü"}  # U+2028 unescaped inside JSON must not split the event
    wire = ("data: " + json.dumps(payload, ensure_ascii=False) + "\r\n\r\n" + "data: [DONE]\r\n\r\n").encode()
    dec = SSEDecoder()
    events: list[SSEEvent] = []
    for i in range(len(wire)):  # one byte at a time, including between \r and \n
        events += dec.feed(wire[i : i + 1])
    events += dec.flush()
    assert [e.data for e in events] == [json.dumps(payload, ensure_ascii=False), "[DONE]"]
    # missing final blank line: flush still dispatches
    dec = SSEDecoder()
    assert dec.feed(b'data: {"text": "x"}') == []
    assert [e.data for e in dec.flush()] == ['{"text": "x"}']


def test_parse_openai_chat_and_completions_stream() -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": None}], "usage": None},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
        "[DONE]",
    ]
    dec = SSEDecoder()
    events = [e for c in _sse(*chunks) for e in dec.feed(c)]
    parsed = [parse_openai_event(e) for e in events]
    assert [p.text for p in parsed] == ["", "Hi", " there", "", "", ""]
    assert parsed[3].finish_reason == "length"
    assert parsed[4].completion_tokens == 2
    assert [p.done for p in parsed] == [False] * 5 + [True]
    comp = parse_openai_event(SSEEvent(data=json.dumps({"choices": [{"text": "abc", "finish_reason": None}]})))
    assert comp.text == "abc"
    err = parse_openai_event(SSEEvent(data=json.dumps({"error": {"message": "overloaded"}})))
    assert err.error == "overloaded" and err.done


# ------------------------------------------------------------------------------ single requests


def test_streamed_generate_measures_ttft_itl_and_tokens() -> None:
    chunks = _sse(
        {"text": "a"},
        {"text": "b"},
        {"text": "c"},
        {"text": "", "finish_reason": "stop", "usage": {"prompt_tokens": 2, "completion_tokens": 7}},
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/generate" and body["stream"] is True
        return _stream_response(chunks, gap=0.03)

    lv = _run_level(handler, "generate-stream", concurrency=1, requests=2, duration=10)
    assert lv.summary.ok == 2
    for rec in lv.records:
        assert rec.ttft == pytest.approx(0.03)  # each chunk comes 30 ms after the previous one
        assert rec.itl == pytest.approx([0.03, 0.03])  # three text chunks, two gaps
        assert rec.output_tokens == 7  # usage wins over chunk count
        assert rec.latency == pytest.approx(0.12)  # the final event, without text, 30 ms later
    s = lv.summary
    assert s.ttft_ms == pytest.approx({"p50": 30.0, "p90": 30.0, "p99": 30.0})
    assert s.itl_ms == pytest.approx({"p50": 30.0, "p90": 30.0, "p99": 30.0})
    assert s.tpot_ms == pytest.approx({"p50": 10.0, "p90": 10.0, "p99": 10.0})  # 60 ms over 6 more tokens
    assert s.duration_s == pytest.approx(0.24) and s.output_tokens_per_s == pytest.approx(14 / 0.24, rel=1e-3)
    assert s.ttft_samples_ms == pytest.approx([30.0, 30.0])


def test_openai_stream_with_v1_base_url_counts_chunks_without_usage() -> None:
    chunks = _sse(
        {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "x"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "y"}, "finish_reason": "stop"}]},
        "[DONE]",
    )
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        body = json.loads(request.content)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["messages"][-1]["role"] == "user"
        return _stream_response(chunks, gap=0.0)

    lv = _run_level(handler, "openai-chat-stream", base=BASE + "/v1", concurrency=2, requests=4, duration=10)
    assert seen == ["/v1/chat/completions"] * 4  # /v1 base not doubled
    assert lv.summary.ok == 4
    assert all(r.output_tokens == 2 for r in lv.records)  # no usage: count of text chunks


def test_incomplete_stream_and_in_stream_error_are_errors() -> None:
    async def truncated(request: httpx.Request) -> httpx.Response:
        return _stream_response(_sse({"text": "a"}), gap=0.0)

    lv = _run_level(truncated, "generate-stream", concurrency=1, requests=2, duration=5)
    assert lv.summary.errors == {"error:IncompleteStream": 2} and lv.summary.ok == 0

    async def failing(request: httpx.Request) -> httpx.Response:
        return _stream_response(_sse({"text": "a"}, {"error": {"message": "engine died"}}), gap=0.0)

    lv = _run_level(failing, "generate-stream", concurrency=1, requests=1, duration=5)
    assert lv.summary.errors == {"error:StreamError": 1}
    assert lv.records[0].error == "engine died" and lv.records[0].ttft is None


# ------------------------------------------------------------------------------ loop mechanics


def test_closed_loop_sends_exactly_requests_at_fixed_concurrency() -> None:
    tracker = Tracker(delay=0.02)
    lv = _run_level(tracker, concurrency=4, requests=20, duration=30, seed=3)
    s = lv.summary
    assert tracker.calls == 20 and s.requests == 20 and s.ok == 20 and s.errors == {}
    assert tracker.peak == 4
    assert [r.index for r in lv.records] == list(range(20))
    assert s.mode == "closed" and s.concurrency == 4 and s.level == "c=4"
    assert s.mean_output_tokens == 5 and s.output_tokens_per_s == pytest.approx(100 / s.duration_s, rel=1e-3)
    assert s.throughput_rps == pytest.approx(20 / s.duration_s, rel=1e-3)
    assert s.duration_s == pytest.approx(0.1)  # five rounds of four 20 ms requests
    assert s.latency_ms == pytest.approx({"p50": 20.0, "p90": 20.0, "p99": 20.0, "mean": 20.0, "max": 20.0})
    assert s.ttft_ms is None  # not a streaming scenario
    # a concurrency above the request budget does not overshoot it
    tracker = Tracker(delay=0.0)
    assert _run_level(tracker, concurrency=8, requests=3, duration=30).summary.requests == 3
    assert tracker.calls == 3


def test_open_loop_respects_request_budget() -> None:
    tracker = Tracker(delay=0.01)
    lv = _run_level(tracker, rate=200.0, requests=15, duration=30, seed=1)
    assert tracker.calls == 15 and lv.summary.requests == 15 and lv.summary.ok == 15
    assert lv.summary.dropped_by_client == 0 and lv.summary.mode == "open"
    # each request starts at its arrival on the seeded Poisson schedule; the level ends with the last answer
    offsets = arrival_offsets(200.0, 15, seed=1)
    assert [rec.start for rec in lv.records] == pytest.approx(offsets)
    assert lv.summary.duration_s == pytest.approx(offsets[-1] + 0.01, abs=1e-6)  # rounded to the µs


def test_duration_bounds_closed_and_open_loops() -> None:
    tracker = Tracker(delay=0.05)
    lv = _run_level(tracker, concurrency=2, requests=100_000, duration=0.3)
    # two workers start a request every 50 ms while under 0.3 s (at 0, 0.05, ..., 0.25); the last ends at 0.3
    assert lv.summary.requests == tracker.calls == 12
    assert max(r.start for r in lv.records) == pytest.approx(0.25)
    assert lv.summary.duration_s == pytest.approx(0.3)

    tracker = Tracker(delay=0.01)
    lv = _run_level(tracker, rate=100.0, requests=100_000, duration=0.3, seed=2)
    in_time = [t for t in arrival_offsets(100.0, 100, seed=2) if t < 0.3]
    assert [r.start for r in lv.records] == pytest.approx(in_time)  # no arrival at or after 0.3 s is sent
    assert lv.summary.duration_s == pytest.approx(in_time[-1] + 0.01, abs=1e-6)


def test_open_loop_in_flight_cap_drops_and_counts() -> None:
    tracker = Tracker(delay=0.3)
    lv = _run_level(tracker, rate=500.0, requests=30, duration=30, max_in_flight=3, seed=5)
    s = lv.summary
    assert tracker.peak <= 3
    assert s.dropped_by_client > 0
    assert s.requests + s.dropped_by_client == 30  # every arrival either sent or dropped
    assert s.requests == tracker.calls == s.ok


def test_errors_counted_by_status_and_exception() -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.001)
        if calls % 3 == 0:
            return httpx.Response(429, headers={"Retry-After": "1"}, json={"error": "overloaded"})
        if calls == 5:
            return httpx.Response(503, json={"error": "unavailable"})
        if calls == 7:
            raise httpx.ConnectError("connection refused")
        if calls == 8:
            return httpx.Response(200, json={"unexpected": True})
        return httpx.Response(200, json={"text": "x", "finish_reason": "stop"})

    lv = _run_level(handler, concurrency=1, requests=9, duration=30)
    s = lv.summary
    # calls 1, 2, 4 ok; 3, 6, 9 -> 429; 5 -> 503; 7 -> connection error; 8 -> malformed body
    assert s.requests == 9 and s.ok == 3
    assert s.errors == {"429": 3, "503": 1, "error:BadResponse": 1, "error:ConnectError": 1}
    assert lv.records[2].status == 429 and "overloaded" in (lv.records[2].error or "")
    assert s.throughput_rps == pytest.approx(3 / s.duration_s, rel=1e-3)


def test_request_timeout_bounds_a_stuck_request() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json={"text": "late"})

    lv = _run_level(slow, concurrency=2, requests=2, duration=30, timeout=0.2)
    assert lv.summary.errors == {"error:TimeoutError": 2}
    assert [r.latency for r in lv.records] == pytest.approx([0.2, 0.2])
    assert lv.summary.duration_s == pytest.approx(0.2)


def test_sweep_runs_levels_in_order_and_warmup_is_not_recorded() -> None:
    tracker = Tracker(delay=0.005)
    result = run_virtual(
        run_sweep(
            BASE,
            make_scenario("generate", max_tokens=8),
            concurrencies=[1, 3],
            requests=6,
            duration=30,
            warmup=2,
            transport=httpx.MockTransport(tracker),
        )
    )
    assert [s.level for s in result.summaries] == ["c=1", "c=3"]
    assert [s.requests for s in result.summaries] == [6, 6]
    assert tracker.calls == 2 + 12
    assert result.config["scenario"] == "generate" and result.environment["target"] == BASE


def test_summarize_percentiles_only_over_successes() -> None:
    recs = [
        RequestRecord(index=i, start=0, end=lat, latency=lat, status=st)
        for i, (lat, st) in enumerate([(0.1, 200), (0.2, 200), (0.3, 200), (0.001, 429), (9.0, "error:X")])
    ]
    s = summarize(recs, mode="closed", concurrency=1, rate=None, duration_s=1.0)
    assert s.latency_ms == {"p50": 200.0, "p90": 280.0, "p99": 298.0, "mean": 200.0, "max": 300.0}
    assert s.errors == {"429": 1, "error:X": 1} and s.ok == 3 and s.requests == 5


def test_arrival_offsets_seeded_poisson() -> None:
    a = arrival_offsets(10.0, 2000, seed=7)
    assert a == arrival_offsets(10.0, 2000, seed=7) and a != arrival_offsets(10.0, 2000, seed=8)
    assert all(x < y for x, y in itertools.pairwise(a))
    assert a[-1] / len(a) == pytest.approx(0.1, rel=0.1)  # mean gap 1/rate


# ------------------------------------------------------------------------------ safety


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://localhost:9/v1", "http://[::1]:8000", "https://127.5.0.1"]
)
def test_loopback_targets_allowed(url: str) -> None:
    check_target(url)


@pytest.mark.parametrize(
    "url", ["http://example.com", "http://10.0.0.5:8000", "http://0.0.0.0:8000", "http://localhost.evil.com"]
)
def test_non_loopback_targets_refused(url: str) -> None:
    with pytest.raises(TargetRefused):
        check_target(url)
    check_target(url, allow_remote=True)  # explicit opt-in passes


def test_refusal_happens_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    tracker = Tracker()
    with pytest.raises(TargetRefused):
        run_virtual(
            run_sweep(
                "http://example.com",
                make_scenario("generate"),
                concurrencies=[1],
                requests=1,
                duration=1,
                transport=httpx.MockTransport(tracker),
            )
        )
    with pytest.raises(TargetRefused):
        _run_level(tracker, base="http://example.com", concurrency=1, requests=1, duration=1)
    assert tracker.calls == 0
    assert cli.main(["--url", "http://example.com:8000", "--requests", "1", "--no-progress"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    with pytest.raises(TargetRefused):
        check_target("ftp://127.0.0.1/")


# ------------------------------------------------------------------------------ scenarios, prompts


def test_scenario_bodies() -> None:
    import random

    rng = random.Random(0)
    body = make_scenario("generate-stream", max_tokens=9, top_k=5, stop=["\n"], request_seed=True).make_body(rng)
    assert body["stream"] is True and body["max_tokens"] == 9 and body["top_k"] == 5 and body["stop"] == ["\n"]
    assert isinstance(body["seed"], int) and ("prompt" in body or "messages" in body)
    body = make_scenario("generate", use_messages=True, prompts=["hi"]).make_body(rng)
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["stream"] is False
    body = make_scenario("classify", batch_size=3, labels=["a", "b"], multi_label=True).make_body(rng)
    assert len(body["inputs"]) == 3 and body["labels"] == ["a", "b"] and body["multi_label"] is True
    assert "labels" not in make_scenario("classify", labels=()).make_body(rng)
    body = make_scenario("openai-completions", model="m", prompts=[[{"role": "user", "content": "q"}]]).make_body(rng)
    assert body == {"model": "m", "prompt": "q", "max_tokens": 64, "temperature": 0.0, "stream": False}
    body = make_scenario("openai-chat-stream", stream_usage=False).make_body(rng)
    assert "stream_options" not in body and body["stream"] is True
    with pytest.raises(ValueError):
        make_scenario("nope")


def test_seeded_bodies_are_reproducible() -> None:
    import random

    sc = make_scenario("generate")
    a = [sc.make_body(r) for r in [random.Random(4)] for _ in range(10)]
    b = [sc.make_body(r) for r in [random.Random(4)] for _ in range(10)]
    assert a == b


def test_load_prompts(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first question\n\n  second  \n", encoding="utf-8")
    assert loadgen.load_prompts(txt) == ["first question", "second"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        '"plain"\n{"prompt": "p"}\n{"messages": [{"role": "user", "content": "m"}]}\n\n'
        '[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]\n',
        encoding="utf-8",
    )
    items = loadgen.load_prompts(jl)
    assert items[:2] == ["plain", "p"] and items[2] == [{"role": "user", "content": "m"}]
    assert loadgen.as_text(items[3]) == "u"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("42\n", encoding="utf-8")
    with pytest.raises(ValueError):
        loadgen.load_prompts(bad)


# ------------------------------------------------------------------------------ reports


def _streaming_sweep() -> loadgen.SweepResult:
    chunks = _sse({"text": "a"}, {"text": "b"}, {"text": "", "finish_reason": "stop"})
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 4:
            return httpx.Response(429, json={"error": "busy"})
        return _stream_response(chunks, gap=0.002)

    return run_virtual(
        run_sweep(
            BASE,
            make_scenario("generate-stream"),
            concurrencies=[1, 2],
            requests=5,
            duration=30,
            transport=httpx.MockTransport(handler),
            label="ours",
        )
    )


def test_report_writes_json_markdown_and_pngs(tmp_path: Path) -> None:
    result = _streaming_sweep()
    written = report.write_report(result, tmp_path, raw=True)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {"schema_version", "config", "environment", "levels"} <= doc.keys()
    assert {"target", "date", "hostname", "platform", "python"} <= doc["environment"].keys()
    assert doc["config"]["scenario"] == "generate-stream" and doc["config"]["concurrencies"] == [1, 2]
    level_keys = {
        "level",
        "mode",
        "concurrency",
        "rate",
        "requests",
        "ok",
        "errors",
        "dropped_by_client",
        "duration_s",
        "throughput_rps",
        "output_tokens_per_s",
        "latency_ms",
        "ttft_ms",
        "itl_ms",
        "records",
    }
    for lv in doc["levels"]:
        assert level_keys <= lv.keys()
        assert {"p50", "p90", "p99", "mean", "max"} <= lv["latency_ms"].keys()
        assert {"p50", "p90", "p99"} <= lv["ttft_ms"].keys() and {"p50", "p90", "p99"} <= lv["itl_ms"].keys()
        assert len(lv["records"]) == lv["requests"] == 5
    assert doc["levels"][0]["errors"] == {"429": 1}

    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| c=")]
    assert [r.split("|")[1].strip() for r in rows] == ["c=1", "c=2"]
    assert "429: 1" in rows[0] and "TTFT p50" in md

    assert "records" not in report.write_report(result, tmp_path / "noraw")["json"].read_text()

    pytest.importorskip("matplotlib")
    for name in ("latency_vs_throughput.png", "ttft_hist.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert {"latency_plot", "ttft_plot"} <= written.keys()


def test_report_compare_cli_and_non_streaming(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    tracker = Tracker(delay=0.001)
    whole = run_virtual(
        run_sweep(
            BASE,
            make_scenario("generate"),
            rates=[50, 100],
            requests=5,
            duration=10,
            transport=httpx.MockTransport(tracker),
            label="peer",
        )
    )
    written = report.write_report(whole, tmp_path / "peer")
    assert "ttft_plot" not in written and "latency_plot" in written  # no TTFT for whole responses
    report.write_report(_streaming_sweep(), tmp_path / "ours")
    assert (
        report.main(
            [
                str(tmp_path / "ours/results.json"),
                str(tmp_path / "peer/results.json"),
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    md = (tmp_path / "cmp/results.md").read_text()
    assert "| ours | c=1 |" in md and "| peer | rate=50/s |" in md
    assert (tmp_path / "cmp/latency_vs_throughput.png").exists() and (tmp_path / "cmp/ttft_hist.png").exists()


def test_load_is_spread_over_clients() -> None:
    """make_clients: one client per CONNECTIONS_PER_CLIENT in flight; closed-loop workers round-robin over them."""
    tracker = Tracker()
    seen: dict[str, int] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        seen[request.headers["x-client"]] = seen.get(request.headers["x-client"], 0) + 1
        return await tracker(request)

    async def go():
        clients = loadgen.make_clients(BASE, 20, transport=httpx.MockTransport(handler))
        assert len(clients) == -(-20 // loadgen.CONNECTIONS_PER_CLIENT)
        for i, c in enumerate(clients):
            c.headers["x-client"] = str(i)
        try:
            return await run_level(clients, make_scenario("generate"), concurrency=20, requests=60, duration=30)
        finally:
            for c in clients:
                await c.aclose()

    lv = run_virtual(go())
    assert lv.summary.ok == 60 and tracker.peak == 20
    assert sorted(seen) == [str(i) for i in range(len(seen))] and len(seen) == 3 and min(seen.values()) >= 12


def test_soak_sums_resident_memory_over_the_process_tree() -> None:
    """The soak's memory is every server process's (supervisor, engine cores, API servers): this process's
    tree holds at least this process, with its own resident memory."""
    tree = tree_rss(os.getppid())
    assert os.getpid() in tree and os.getppid() in tree
    name, rss_bytes = tree[os.getpid()]
    assert name and rss_bytes > 10 * 2**20  # a Python process with pytest loaded
    assert tree_rss(2**22 + 12345) == {}  # no such process
