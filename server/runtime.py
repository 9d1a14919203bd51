"""Startup wiring: load and prepare the models, build the engines, warm them up.

This is the one place that knows how the pieces fit; routes only see a ready :class:`Runtime`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch

from engine.batcher import DynamicBatcher
from engine.classifier import Classifier, ClassifierInputError, ClassifyItem, ClassResult, Embedding
from engine.llm_engine import AsyncLLM, EngineConfig, LLMEngine
from engine.response_cache import ResponseCache
from engine.sequence import SamplingParams
from models.compress import CompressionReport, compress_causal_lm, compress_encoder, default_spec
from models.llama import Llama
from models.loader import LoadedEncoder, load_causal_lm, load_encoder
from models.sources import resolve_spec
from server import metrics
from server.config import Settings

log = logging.getLogger(__name__)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=settings.max_num_seqs,
        max_batched_tokens=settings.prefill_budget(),
        kv_cache_tokens=settings.kv_cache_tokens,
        block_size=settings.kv_block_size,
        max_model_len=settings.max_input_tokens + settings.max_new_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
    )


def _package_version() -> str:
    """The installed distribution's version; a source checkout run without ``pip install`` has none."""
    try:
        return version("lowlat-server")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Runtime:
    settings: Settings
    device: torch.device
    llm: AsyncLLM | None = None
    classifier: Classifier | None = None
    batcher: DynamicBatcher[ClassifyItem, ClassResult | Embedding | ClassifierInputError] | None = None
    # Identical /classify inputs, keyed by (model id, text, labels, multi_label); None when disabled.
    cls_cache: ResponseCache[tuple[str, str, tuple[str, ...] | None, bool], ClassResult] | None = None
    gen_model_id: str | None = None  # the names /v1/models lists and the /v1 routes accept as `model`
    cls_model_id: str | None = None
    ready: bool = False
    created: int = field(default_factory=lambda: int(time.time()))  # unix time, /v1/models' `created`
    info: dict[str, object] = field(default_factory=dict)
    reports: dict[str, CompressionReport] = field(default_factory=dict)  # "generate" / "classify"

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Blocking: loads every enabled model. Run it off the event loop."""
        device, dtype = settings.torch_device(), settings.torch_dtype()
        rt = cls(settings=settings, device=device)
        if settings.enable_generate:
            start = time.perf_counter()
            loaded = load_causal_lm(settings.gen_model, settings.cache_dir, dtype, settings.tokenizer)
            model = Llama.from_hf(loaded.config, loaded.state_dict).to(device)
            spec = default_spec(settings.quantize_method("gen"), settings.gen_prune)
            cache = settings.cache_dir if settings.compress_cache else None
            model, report = compress_causal_lm(model, loaded.config, loaded.tokenizer, spec, loaded.source, cache)
            rt.reports["generate"] = report
            log.info("compression %s", report.summary())
            engine = LLMEngine(model, loaded.tokenizer, device, dtype, engine_config(settings))
            rt.llm = AsyncLLM(engine, on_error=lambda _: metrics.READY.set(0))  # /ready is 503 from now on
            rt.gen_model_id = resolve_spec(settings.gen_model, "generate").name
            rt.info["generate"] = {"model": loaded.source, "load_seconds": rt._loaded("generate", start)}
        if settings.enable_classify:
            start = time.perf_counter()
            encoder = load_encoder(settings.cls_model, settings.cache_dir, dtype, None)
            encoder.model.to(device)
            spec = default_spec(settings.quantize_method("cls"), settings.cls_prune, "classify")
            cache = settings.cache_dir if settings.compress_cache else None

            def embedder(enc: LoadedEncoder) -> Callable[[list[str]], torch.Tensor]:
                return Classifier(enc, device).embed

            report = compress_encoder(encoder, spec, cache, embedder)
            rt.reports["classify"] = report
            log.info("compression %s", report.summary())
            rt.classifier = Classifier(encoder, device, max_batch=settings.cls_max_batch_size)
            rt.classifier.capture_graphs(settings.cls_max_batch_tokens)  # before the engines start
            rt.cls_model_id = resolve_spec(settings.cls_model, "classify").name
            if settings.cls_cache_size > 0:
                rt.cls_cache = ResponseCache(settings.cls_cache_size, name="classify")
            rt.info["classify"] = {"model": encoder.source, "load_seconds": rt._loaded("classify", start)}
        metrics.BUILD_INFO.info(
            {
                "version": _package_version(),
                "gen_model": rt.info["generate"]["model"] if "generate" in rt.info else "off",
                "cls_model": rt.info["classify"]["model"] if "classify" in rt.info else "off",
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
            }
        )
        return rt

    def _loaded(self, model: str, start: float) -> float:
        seconds = time.perf_counter() - start
        metrics.MODEL_LOAD_SECONDS.labels(model=model).set(seconds)
        return round(seconds, 2)

    async def start(self) -> None:
        """Starts the engine thread and batcher on the running loop, then warms both up."""
        s = self.settings
        if self.llm is not None:
            self.llm.start()
            start = time.perf_counter()
            async for _ in self.llm.generate([0, 1, 2], SamplingParams(max_tokens=2), "warmup"):
                pass
            metrics.WARMUP_SECONDS.labels(model="generate").set(time.perf_counter() - start)
        if self.classifier is not None:
            self.batcher = DynamicBatcher(
                self.classifier.run,
                max_batch_size=s.cls_max_batch_size,
                max_batch_tokens=s.cls_max_batch_tokens,
                max_wait_ms=s.cls_max_wait_ms,
                max_queued=s.cls_max_queued_inputs,
                cost=lambda item: item.n_tokens,
                name="classify",
            )
            self.batcher.start()
            start = time.perf_counter()
            await self.batcher.submit(ClassifyItem("warm up", ("a", "b"), False, 4))
            metrics.WARMUP_SECONDS.labels(model="classify").set(time.perf_counter() - start)
        self.ready = True
        metrics.READY.set(1)
        log.info("ready on %s", self.device)

    @property
    def failure(self) -> str | None:
        """Why the runtime cannot serve although it started (a generation step raised), or None.
        The message names only the error type: details, with request ids, are in the server log."""
        if self.llm is not None and self.llm.error is not None:
            return f"{self.llm.error}; see the server log"
        return None

    async def stop(self) -> None:
        self.ready = False
        metrics.READY.set(0)
        if self.batcher is not None:
            await self.batcher.stop()
        if self.llm is not None:
            await asyncio.to_thread(self.llm.stop)
