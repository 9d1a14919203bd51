"""What a run measured: per-request records, per-level summaries (percentiles over successes only),
the sweep document written as ``results.json``, and where it was measured.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx

SCHEMA_VERSION = 1


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics.

    Same definition as numpy's default (``method="linear"``): position ``(n - 1) * q / 100`` in
    the sorted data, interpolated between its neighbours. None for no data (JSON null), so an
    empty level never reports a fake 0 ms.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _stats_ms(values_s: Sequence[float], *, extra: bool = False) -> dict[str, float | None]:
    """p50/p90/p99 (and mean/max when ``extra``) of durations in seconds, as milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    out: dict[str, float | None] = {f"p{q}": _round(percentile(ms, q)) for q in (50, 90, 99)}
    if extra:
        out["mean"] = _round(sum(ms) / len(ms)) if ms else None
        out["max"] = _round(max(ms)) if ms else None
    return out


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class RequestRecord:
    """One request. Times are seconds; ``start``/``end`` are relative to the level's start.

    ``status`` is the HTTP status code, or ``"error:<ExceptionName>"`` when no usable response
    came back (connection error, timeout, malformed body, error inside a stream).
    """

    index: int
    start: float
    end: float
    latency: float
    status: int | str
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    items: int = 1
    error: str | None = None
    retry_after: str | None = None  # the Retry-After header of a refusal

    @property
    def ok(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300


@dataclass
class LevelSummary:
    """Aggregates for one load level. Latency/TTFT/ITL/TPOT in ms, over successful requests only
    (a fast 429 is not a fast answer); errors keyed by status code or ``error:<Exception>``."""

    mode: str  # "closed" | "open"
    concurrency: int | None
    rate: float | None
    requests: int  # requests sent (excludes dropped_by_client)
    ok: int
    errors: dict[str, int]
    dropped_by_client: int
    duration_s: float
    throughput_rps: float  # successful requests / s
    output_tokens_per_s: float
    items_per_s: float  # successful inputs / s (classification batches count each input)
    mean_output_tokens: float | None
    latency_ms: dict[str, float | None]
    ttft_ms: dict[str, float | None] | None = None
    itl_ms: dict[str, float | None] | None = None
    tpot_ms: dict[str, float | None] | None = None
    ttft_samples_ms: list[float] | None = None  # kept so reports can draw TTFT histograms

    @property
    def level(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = self.level
        return d


def summarize(
    records: Sequence[RequestRecord],
    *,
    mode: str,
    concurrency: int | None,
    rate: float | None,
    duration_s: float,
    dropped_by_client: int = 0,
    streaming: bool = False,
) -> LevelSummary:
    """Reduce per-request records to the numbers a report shows."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    dur = max(duration_s, 1e-9)
    tokens = sum(r.output_tokens for r in ok)
    summary = LevelSummary(
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        requests=len(records),
        ok=len(ok),
        errors=dict(sorted(errors.items())),
        dropped_by_client=dropped_by_client,
        duration_s=round(duration_s, 6),
        throughput_rps=round(len(ok) / dur, 4),
        output_tokens_per_s=round(tokens / dur, 3),
        items_per_s=round(sum(r.items for r in ok) / dur, 3),
        mean_output_tokens=round(tokens / len(ok), 3) if ok else None,
        latency_ms=_stats_ms([r.latency for r in ok], extra=True),
    )
    if streaming:
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        gaps = [g for r in ok for g in r.itl]
        tpots = [sum(r.itl) / (r.output_tokens - 1) for r in ok if r.itl and r.output_tokens > 1]
        summary.ttft_ms = _stats_ms(ttfts)
        summary.itl_ms = _stats_ms(gaps)
        summary.tpot_ms = _stats_ms(tpots)
        summary.ttft_samples_ms = [round(t * 1000.0, 3) for t in ttfts]
    return summary


@dataclass
class LevelResult:
    """One load level: its records plus the summary computed from them."""

    summary: LevelSummary
    records: list[RequestRecord]
    started_at: str  # ISO-8601 UTC wall time

    def to_dict(self, raw: bool = False) -> dict[str, Any]:
        d = self.summary.to_dict()
        d["started_at"] = self.started_at
        if raw:
            d["records"] = [asdict(r) for r in self.records]
        return d


@dataclass
class SweepResult:
    """A sweep: configuration, environment and one LevelResult per level, in run order."""

    config: dict[str, Any]
    environment: dict[str, Any]
    levels: list[LevelResult]

    @property
    def summaries(self) -> list[LevelSummary]:
        return [lv.summary for lv in self.levels]

    def to_dict(self, raw: bool = False) -> dict[str, Any]:
        """The ``results.json`` document."""
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self.config,
            "environment": self.environment,
            "levels": [lv.to_dict(raw=raw) for lv in self.levels],
        }


def environment_info(target: str) -> dict[str, Any]:
    """Where and when a result was measured, so numbers are never compared blind."""
    return {
        "target": target,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "argv": list(sys.argv),
    }
