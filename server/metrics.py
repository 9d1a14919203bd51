"""Server-level Prometheus metrics: HTTP, startup (build info, load and warm-up times, readiness) and GPU
memory. Engine-level ones (batches, queue wait, KV usage) are in engine/metrics.py."""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from engine.metrics import LATENCY_BUCKETS
from server.asgi import HTTPMiddleware, Receive, Scope, Send, WatchedSend

# Routes we label by name; anything else is "other" so scanners cannot blow up label cardinality.
ENDPOINTS = {
    "/generate",
    "/classify",
    "/health",
    "/ready",
    "/metrics",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/embeddings",
}

REQUEST_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Request latency from arrival to the last byte sent",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter("http_requests_total", "Requests by endpoint and status code", ["endpoint", "status"])
IN_FLIGHT = Gauge("http_requests_in_flight", "Requests being served", ["endpoint"], multiprocess_mode="livesum")
TTFT = Histogram("llm_time_to_first_token_seconds", "Request arrival to first generated token", buckets=LATENCY_BUCKETS)
ITL = Histogram("llm_inter_token_latency_seconds", "Time between generated tokens", buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("llm_prompt_tokens_total", "Prompt tokens of finished generate requests")
GENERATED_TOKENS = Counter("llm_generated_tokens_total", "Tokens generated")
CLASSIFY_INPUTS = Counter("classify_inputs_total", "Texts classified")

# A gauge of value 1, as prometheus_client's Info exposes it; Info has no multiprocess support.
BUILD_INFO = Gauge(
    "llm_build_info",
    "Server version, models, device and dtype",
    ["version", "gen_model", "cls_model", "device", "dtype"],
    multiprocess_mode="max",
)
# Every process of the server sets it: the minimum says whether all of them can serve.
READY = Gauge("llm_ready", "1 once the models are loaded and warmed up, else 0", multiprocess_mode="livemin")
MODEL_LOAD_SECONDS = Gauge(
    "llm_model_load_seconds", "Startup time to load and prepare a model", ["model"], multiprocess_mode="max"
)
WARMUP_SECONDS = Gauge(
    "llm_warmup_seconds", "Startup time of a model's warm-up pass", ["model"], multiprocess_mode="max"
)

log = logging.getLogger(__name__)

# name -> help; the gpu label is the CUDA device index as this process sees it.
GPU_METRICS = {
    "llm_gpu_memory_allocated_bytes": "Memory held by tensors of this process (torch allocator)",
    "llm_gpu_memory_reserved_bytes": "Memory reserved by this process's torch caching allocator",
    "llm_gpu_memory_used_bytes": "Memory in use on the device, all processes (NVML)",
    "llm_gpu_memory_total_bytes": "Memory of the device (NVML)",
    "llm_gpu_utilization_ratio": "Fraction of the last sample period a kernel ran on the device (NVML)",
}


def load_nvml() -> ModuleType | None:
    """pynvml (the ``gpu`` extra, nvidia-ml-py) initialised, or None where it is missing or has no driver."""
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVMLError without a driver
        log.info("GPU utilisation metrics off (NVML unavailable: %s)", exc)
        return None
    return pynvml


class GPUCollector(Collector):
    """Reads GPU gauges at scrape time, so no thread polls the device between scrapes. Only a device this
    process has initialised is reported: on CPU, and on a GPU host serving on CPU, the series are absent."""

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self._nvml_tried = False

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, doc in GPU_METRICS.items():
            yield GaugeMetricFamily(name, doc, labels=["gpu"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reading = self.read()
        if reading is None:
            return
        label, values = reading
        for family in self.describe():
            if family.name in values:
                family.add_metric([label], values[family.name])
                yield family

    def read(self) -> tuple[str, dict[str, float]] | None:
        """(gpu label, gauge values) of this process's device, or None where it has none."""
        import torch  # loaded already wherever a device is used; the supervisor imports this module without it

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        index = torch.cuda.current_device()
        values = {
            "llm_gpu_memory_allocated_bytes": torch.cuda.memory_allocated(index),
            "llm_gpu_memory_reserved_bytes": torch.cuda.memory_reserved(index),
        }
        values.update(self._nvml_values(lambda: str(torch.cuda.get_device_properties(index).uuid)))
        return _gpu_label(index), values

    def _nvml_values(self, device_uuid: Callable[[], str]) -> dict[str, float]:
        if not self._nvml_tried:
            self._nvml_tried = True
            self._nvml = load_nvml()
        nvml = self._nvml
        if nvml is None:
            return {}
        try:
            # By UUID: NVML numbers devices ignoring CUDA_VISIBLE_DEVICES, torch does not.
            uuid = device_uuid()
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
        except Exception as exc:  # e.g. MIG slices report no utilisation
            log.debug("NVML read failed: %s", exc)
            return {}
        return {
            "llm_gpu_memory_used_bytes": memory.used,
            "llm_gpu_memory_total_bytes": memory.total,
            "llm_gpu_utilization_ratio": busy,
        }


def _gpu_label(index: int) -> str:
    """The device as the host numbers it: an engine core of a data-parallel server sees only its own GPU,
    as its cuda:0 (CUDA_VISIBLE_DEVICES)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


REGISTRY.register(GPUCollector())

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GPU_PUBLISH_INTERVAL_S = 5.0


def publish_gpu_metrics() -> None:
    """In an engine-core process: writes the GPU gauges every few seconds where a scrape of any API server
    reads them (the scraping process has no device to read at scrape time)."""
    gauges = {
        name: Gauge(name, doc, ["gpu"], multiprocess_mode="livemax", registry=None) for name, doc in GPU_METRICS.items()
    }
    collector = GPUCollector()

    def loop() -> None:
        while True:
            reading = collector.read()
            if reading is not None:
                label, values = reading
                for name, value in values.items():
                    gauges[name].labels(gpu=label).set(value)
            time.sleep(GPU_PUBLISH_INTERVAL_S)

    threading.Thread(target=loop, name="gpu-metrics", daemon=True).start()


class ServerProcessesCollector(Collector):
    """Resident memory and CPU time of all the server's processes, summed (the default process collector
    sees only the process that answers the scrape). They are the processes with metric files."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pids = {os.getpid(), os.getppid()}
        pids |= {int(m.group(1)) for f in os.listdir(self.directory) if (m := _PID_FILE.search(f))}
        rss = cpu = 0.0
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone, or no procfs
            cpu += (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS  # utime + stime
            rss += pages * _PAGE_SIZE
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of all server processes", rss)
        yield CounterMetricFamily("process_cpu_seconds", "CPU time of all server processes", cpu)


_PID_FILE = re.compile(r"_(\d+)\.db$")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def exposition() -> tuple[bytes, str]:
    """The scrape body: this process's registry, or, in a server of several processes (``MULTIPROC_ENV``
    set before they started), every process's metrics combined from their files."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(ServerProcessesCollector(os.environ[MULTIPROC_ENV]))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class _Children:
    """A labelled metric's children by label values, each looked up once: ``labels()`` checks, converts and
    locks on every call, which cost each request more than recording the values themselves. Label values
    stay bounded (``ENDPOINTS`` and "other"; HTTP status codes)."""

    def __init__(self, metric: Histogram | Counter | Gauge) -> None:
        self.metric = metric
        self.found: dict[tuple[object, ...], Histogram | Counter | Gauge] = {}

    def __call__(self, *values: object) -> Any:
        child = self.found.get(values)
        if child is None:
            child = self.found[values] = self.metric.labels(*values)
        return child


_LATENCY, _REQUESTS, _IN_FLIGHT = _Children(REQUEST_LATENCY), _Children(REQUESTS), _Children(IN_FLIGHT)


class MetricsMiddleware(HTTPMiddleware):
    """Times each request until its last body chunk, so streamed responses count their full duration."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()

        def observe(status: int) -> None:
            _LATENCY(endpoint).observe(time.perf_counter() - start)
            _REQUESTS(endpoint, status).inc()

        timed_send = WatchedSend(send, observe)
        in_flight = _IN_FLIGHT(endpoint)
        in_flight.inc()
        # Until a body completes, an unfinished request counts as 499 (client gone); an exception escaping
        # the app is a 500 that Starlette's outermost error middleware sends after we return.
        unfinished_status = 499
        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            unfinished_status = 500
            raise
        finally:
            in_flight.dec()
            if not timed_send.done:
                observe(unfinished_status)
