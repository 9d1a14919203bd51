"""Applying load: one measured request, a closed- or open-loop level, a sweep of levels.

Times come from the event loop's clock (``loop.time()``, monotonic), so waits, timeouts and measurements
share one clock, and a test can run a level on a virtual one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import httpx

from load_tests.loadgen.results import LevelResult, RequestRecord, SweepResult, environment_info, summarize
from load_tests.loadgen.scenarios import Scenario
from load_tests.loadgen.sse import SSEDecoder, SSEEvent
from load_tests.loadgen.targets import check_target, resolve_url


class StreamError(Exception):
    """The server reported an error inside a stream."""


class IncompleteStream(Exception):
    """The stream ended without a final event (finish_reason / [DONE])."""


def _short(body: bytes, limit: int = 300) -> str:
    return body[:limit].decode("utf-8", errors="replace")


async def _events(resp: httpx.Response) -> AsyncIterator[SSEEvent]:
    decoder = SSEDecoder()
    async for chunk in resp.aiter_bytes():
        for ev in decoder.feed(chunk):
            yield ev
    for ev in decoder.flush():
        yield ev


async def _exchange(
    client: httpx.AsyncClient,
    scenario: Scenario,
    url: str,
    body: dict[str, Any],
    rec: RequestRecord,
    t_start: float,
) -> None:
    """Do one HTTP exchange, filling ``rec``'s status, tokens and streaming times."""
    if not scenario.stream:
        resp = await client.post(url, json=body)
        rec.status = resp.status_code
        if not rec.ok:
            rec.error, rec.retry_after = _short(resp.content), resp.headers.get("retry-after")
            return
        rec.output_tokens = scenario.parse_whole(resp.json())
        return
    assert scenario.parse_event is not None
    async with client.stream("POST", url, json=body) as resp:
        rec.status = resp.status_code
        if not rec.ok:
            rec.error, rec.retry_after = _short(await resp.aread()), resp.headers.get("retry-after")
            return
        chunk_times: list[float] = []
        usage_tokens: int | None = None
        finished = False
        clock = asyncio.get_running_loop().time
        async for ev in _events(resp):
            now = clock()
            se = scenario.parse_event(ev)
            if se.error is not None:
                raise StreamError(se.error)
            if se.text:
                chunk_times.append(now)
            if se.completion_tokens is not None:
                usage_tokens = se.completion_tokens
            finished = finished or se.done or se.finish_reason is not None
            if se.done:
                break
        if not finished:
            raise IncompleteStream("stream ended without finish_reason or [DONE]")
        if chunk_times:
            rec.ttft = chunk_times[0] - t_start
            rec.itl = [b - a for a, b in itertools.pairwise(chunk_times)]
        rec.output_tokens = usage_tokens if usage_tokens is not None else len(chunk_times)


async def send_request(
    client: httpx.AsyncClient,
    scenario: Scenario,
    url: str,
    body: dict[str, Any],
    *,
    index: int = 0,
    timeout: float = 60.0,
    t0: float | None = None,
) -> RequestRecord:
    """Send one request and measure it; never raises for server or network failures.

    ``timeout`` bounds the whole exchange (a slow trickle of tokens cannot hold a worker forever).
    """
    clock = asyncio.get_running_loop().time
    t_start = clock()
    base = t_start if t0 is None else t0
    rec = RequestRecord(index=index, start=t_start - base, end=0.0, latency=0.0, status="error:NotSent")
    rec.items = scenario.items_per_request
    try:
        await asyncio.wait_for(_exchange(client, scenario, url, body, rec, t_start), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        rec.status, rec.error = "error:TimeoutError", f"no complete response within {timeout:g}s"
        rec.ttft, rec.itl = None, []
    except Exception as exc:  # any failure is a measured outcome, not a crash of the generator
        rec.status, rec.error = f"error:{type(exc).__name__}", str(exc)[:300]
        rec.ttft, rec.itl = None, []
    t_end = clock()
    rec.end = t_end - base
    rec.latency = t_end - t_start
    return rec


def arrival_offsets(rate: float, n: int, seed: int) -> list[float]:
    """First ``n`` arrival times (s) of a Poisson process at ``rate``/s: exponential gaps, seeded."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(f"arrivals:{seed}")
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def run_level(
    client: httpx.AsyncClient | Sequence[httpx.AsyncClient],
    scenario: Scenario,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    requests: int,
    duration: float,
    seed: int = 0,
    timeout: float = 60.0,
    max_in_flight: int = 256,
    progress: Callable[[int], Any] | None = None,
    allow_remote: bool = False,
) -> LevelResult:
    """Run one load level against ``client.base_url`` and return records and summary.

    Exactly one of ``concurrency`` (closed loop: that many workers, each sending its next request
    when the previous one finishes) or ``rate`` (open loop: Poisson arrivals, independent of
    responses, at most ``max_in_flight`` outstanding; arrivals over the cap are counted as
    ``dropped_by_client`` and not sent). No request starts after ``duration`` seconds or beyond
    ``requests`` (arrivals, for open loop); requests in flight then finish, each within
    ``timeout``. So a level lasts at most about ``duration + timeout``.

    ``client`` may be several clients to the same target: worker (closed loop) or request (open loop)
    ``i`` uses ``client[i % len]``. See :func:`make_clients` for why.
    """
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    if requests < 1 or duration <= 0 or timeout <= 0:
        raise ValueError("requests, duration and timeout must be positive")
    clients = [client] if isinstance(client, httpx.AsyncClient) else list(client)
    base_url = str(clients[0].base_url)
    check_target(base_url, allow_remote)
    url = resolve_url(base_url, scenario.path)
    body_rng = random.Random(seed)
    records: list[RequestRecord] = []
    started_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    clock = asyncio.get_running_loop().time
    t0 = clock()
    deadline = t0 + duration
    tick = progress or (lambda n: None)

    async def one(index: int, body: dict[str, Any], client: httpx.AsyncClient) -> None:
        rec = await send_request(client, scenario, url, body, index=index, timeout=timeout, t0=t0)
        records.append(rec)
        tick(1)

    dropped = 0
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        issued = 0

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal issued
            while issued < requests and clock() < deadline:
                index = issued
                issued += 1
                await one(index, scenario.make_body(body_rng), client)

        await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(concurrency)))
        mode = "closed"
    else:
        assert rate is not None
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        in_flight: set[asyncio.Task[None]] = set()
        tasks: list[asyncio.Task[None]] = []
        for index, offset in enumerate(arrival_offsets(rate, requests, seed)):
            if offset >= duration:
                break
            delay = t0 + offset - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if clock() >= deadline:
                break
            body = scenario.make_body(body_rng)  # drawn even when dropped: same bodies per index
            if len(in_flight) >= max_in_flight:
                dropped += 1
                tick(1)
                continue
            task = asyncio.create_task(one(index, body, clients[index % len(clients)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            tasks.append(task)
        await asyncio.gather(*tasks)
        mode = "open"
    elapsed = clock() - t0
    records.sort(key=lambda r: r.index)
    summary = summarize(
        records,
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        duration_s=elapsed,
        dropped_by_client=dropped,
        streaming=scenario.stream,
    )
    return LevelResult(summary=summary, records=records, started_at=started_at)


CONNECTIONS_PER_CLIENT = 8


def make_clients(
    base_url: str,
    concurrency: int,
    *,
    timeout: float = 60.0,
    headers: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[httpx.AsyncClient]:
    """One client per CONNECTIONS_PER_CLIENT requests in flight (workers and requests round-robin over them).

    One AsyncClient with many connections costs more CPU per request as connections grow, until the load
    generator, not the server, is what a high-concurrency run measures (the measurements:
    load_tests/results/gpu/README.md, "What is in the way", item 3).
    """
    count = max(1, -(-concurrency // CONNECTIONS_PER_CLIENT))
    # Each may still open ``concurrency`` connections, so an uneven open-loop spread never waits for one.
    return [
        make_client(base_url, timeout=timeout, max_connections=concurrency, headers=headers, transport=transport)
        for _ in range(count)
    ]


def make_client(
    base_url: str,
    *,
    timeout: float = 60.0,
    max_connections: int = 256,
    headers: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient whose pool is large enough that requests never queue inside the client
    (pool waits would be counted as server latency)."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout),
        limits=limits,
        headers=headers,
        transport=transport,
        trust_env=False,  # never route load through a proxy from the environment
    )


async def run_sweep(
    base_url: str,
    scenario: Scenario,
    *,
    concurrencies: Sequence[int] | None = None,
    rates: Sequence[float] | None = None,
    requests: int = 100,
    duration: float = 60.0,
    seed: int = 0,
    timeout: float = 60.0,
    max_in_flight: int = 256,
    warmup: int = 0,
    allow_remote: bool = False,
    headers: dict[str, str] | None = None,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    label: str | None = None,
) -> SweepResult:
    """Run levels one after another (each ``concurrencies`` value, or each ``rates`` value).

    ``warmup`` requests are sent one at a time before the first level and not recorded (first
    requests pay for lazy initialisation). ``transport`` lets tests substitute an in-process one.
    """
    check_target(base_url, allow_remote)
    if (concurrencies is None) == (rates is None):
        raise ValueError("give exactly one of concurrencies or rates")
    levels: list[tuple[int | None, float | None]] = (
        [(int(c), None) for c in concurrencies]
        if concurrencies is not None
        else [(None, float(r)) for r in rates or ()]
    )
    if not levels:
        raise ValueError("no levels to run")
    cap = max([c for c, _ in levels if c is not None] + [max_in_flight if rates else 1])
    config = {
        "label": label,
        "scenario": scenario.name,
        "scenario_description": scenario.description,
        "path": scenario.path,
        "stream": scenario.stream,
        "mode": "closed" if concurrencies is not None else "open",
        "concurrencies": list(concurrencies) if concurrencies is not None else None,
        "rates": list(rates) if rates is not None else None,
        "requests_per_level": requests,
        "duration_per_level_s": duration,
        "timeout_s": timeout,
        "max_in_flight": max_in_flight,
        "seed": seed,
        "warmup": warmup,
    }
    result = SweepResult(config=config, environment=environment_info(base_url), levels=[])
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(c)
            for c in make_clients(base_url, cap, timeout=timeout, headers=headers, transport=transport)
        ]
        client = clients[0]
        if warmup > 0:
            url = resolve_url(base_url, scenario.path)
            rng = random.Random(f"warmup:{seed}")
            for i in range(warmup):
                await send_request(client, scenario, url, scenario.make_body(rng), index=i, timeout=timeout)
        for concurrency, rate in levels:
            bar = _progress_bar(requests, scenario.name, concurrency, rate) if progress else None
            try:
                level = await run_level(
                    clients,
                    scenario,
                    concurrency=concurrency,
                    rate=rate,
                    requests=requests,
                    duration=duration,
                    seed=seed,
                    timeout=timeout,
                    max_in_flight=max_in_flight,
                    progress=bar.update if bar is not None else None,
                    allow_remote=allow_remote,
                )
            finally:
                if bar is not None:
                    bar.close()
            result.levels.append(level)
    return result


def run_sweep_sync(base_url: str, scenario: Scenario, **kwargs: Any) -> SweepResult:
    """Blocking ``run_sweep`` for tests and scripts outside an event loop."""
    return asyncio.run(run_sweep(base_url, scenario, **kwargs))


def _progress_bar(total: int, name: str, concurrency: int | None, rate: float | None) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a convenience, not a dependency
        return None
    level = f"c={concurrency}" if concurrency is not None else f"rate={rate:g}/s"
    return tqdm(total=total, desc=f"{name} {level}", unit="req", file=sys.stderr, leave=True)
