"""Startup wiring: load and prepare the models, build the engines (:class:`Engines`, the one builder),
and give the routes a :class:`Runtime` over them, whether they run in this process or in engine cores.

This is the one place that knows how the pieces fit; routes only see a ready :class:`Runtime`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.process import BaseProcess

import torch
from transformers import PreTrainedTokenizerBase

from engine.batcher import DynamicBatcher
from engine.classifier import Classifier, ClassifyItem, ClassResult, EncoderFrontend, LabelSpec
from engine.core import Batcher
from engine.core_client import CoreClient
from engine.llm_engine import AsyncLLM, EngineConfig, LLMClient, LLMEngine
from engine.model_runner import ModelRunner
from engine.protocol import AddRequest
from engine.response_cache import ResponseCache
from engine.sequence import SamplingParams
from engine.tp import StepFanout
from models import checkpoint
from models.compress import CompressionReport, compress_causal_lm, compress_encoder, default_spec
from models.llama import Llama
from models.loader import LoadedEncoder, load_causal_lm, load_encoder
from models.sources import resolve_spec
from models.tensor_parallel import local_heads
from server import metrics, tp_workers
from server.config import Settings
from server.hardware import HardwarePolicy
from server.tp_workers import TensorParallel

log = logging.getLogger(__name__)


ClassifyKey = tuple[str, str, tuple[LabelSpec, ...] | None, bool, float | None]


def engine_config(settings: Settings, policy: HardwarePolicy) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=settings.max_num_seqs,
        max_batched_tokens=policy.prefill_budget,
        kv_cache_tokens=settings.kv_cache_tokens,
        block_size=settings.kv_block_size,
        max_model_len=settings.max_input_tokens + settings.max_new_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        compile_decode=policy.compile_decode != "off",
        compile_background=policy.compile_decode == "background",
        speculative=settings.speculative,
        speculative_tokens=settings.speculative_tokens,
    )


def _package_version() -> str:
    """The installed distribution's version; a source checkout run without ``pip install`` has none."""
    try:
        return version("lowlat-server")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Served:
    """What the API side knows of the models it serves, as the builder made them: the same whether the
    engines run in this process or in engine cores (then it comes pickled in :class:`CoreDetails`)."""

    policy: HardwarePolicy  # the (first) engine core's device's; /info shows it
    gen_model_id: str | None = None  # the names /v1/models lists and the /v1 routes accept as `model`
    cls_model_id: str | None = None
    info: dict[str, object] = field(default_factory=dict)  # per task: the model's source and load time
    reports: dict[str, CompressionReport] = field(default_factory=dict)  # "generate" / "classify"


@dataclass
class CoreDetails:
    """What an API server needs from an engine core to serve without the models (pickled in ``Ready``)."""

    tokenizer: PreTrainedTokenizerBase | None
    max_model_len: int
    encoder: EncoderFrontend | None
    served: Served


@dataclass
class Engines:
    """The builder's product: every enabled model loaded, compressed and put in its engine, not yet
    running. The same for the server's own process, an engine-core process and the benchmarks."""

    settings: Settings
    served: Served
    engine: LLMEngine | None = None
    classifier: Classifier | None = None
    follower: ModelRunner | None = None  # a tensor-parallel worker's runner, instead of ``engine``
    tp_workers: list[BaseProcess] = field(default_factory=list)  # rank 0's tensor-parallel worker processes

    @classmethod
    def build(cls, settings: Settings, tp: TensorParallel | None = None) -> Engines:
        """Blocking: decides the hardware policy, then loads every enabled model. Run it off the event loop.
        ``tp``: this is a tensor-parallel worker (server/tp_workers.py), which builds its shard and a
        runner that follows rank 0 (``follower``) instead of an engine."""
        policy = HardwarePolicy.decide(settings)
        log.info("hardware policy: %s", policy.summary())
        if policy.cpu_threads is not None:  # before any model runs: compiled decode steps keep this count
            torch.set_num_threads(policy.cpu_threads)
        device, dtype = policy.torch_device, policy.torch_dtype
        if tp is not None:
            device = tp.device(device)
        served = Served(policy)
        built = cls(settings=settings, served=served)
        if settings.enable_generate:
            start = time.perf_counter()
            source = resolve_spec(settings.gen_model, "generate")
            if source.kind == "checkpoint":  # compressed ahead of time (python -m models.compress): no calibration
                ckpt = checkpoint.read_checkpoint(source.path, "generate", dtype, device)
                model, tokenizer, description = ckpt.model, ckpt.tokenizer, source.description
                report = _checkpoint_report(ckpt.report_json, settings.gen_quantize)
                served.policy = policy = _as_checkpointed(policy, "gen_quantize", report)
            else:
                loaded = load_causal_lm(settings.gen_model, settings.cache_dir, dtype, settings.tokenizer)
                model = Llama.from_hf(loaded.config, loaded.state_dict).to(device)
                spec = default_spec(policy.gen_quantize, policy.gen_prune)
                cache = settings.cache_dir if settings.compress_cache else None
                model, report = compress_causal_lm(model, loaded.config, loaded.tokenizer, spec, loaded.source, cache)
                tokenizer, description = loaded.tokenizer, loaded.source
            served.reports["generate"] = report
            log.info("compression %s", report.summary())
            config = engine_config(settings, policy)
            if config.compile_decode:  # compiled graphs survive restarts (and container volumes) with the models
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "inductor"))
            fanout = None
            if settings.tensor_parallel_size > 1:
                if tp is None:  # rank 0: the other ranks start now and find this model's compression cached
                    if not settings.compress_cache and source.kind != "checkpoint":
                        raise ValueError("tensor_parallel_size > 1 needs compress_cache (or a compressed checkpoint)")
                    local_heads(model.args, settings.tensor_parallel_size)  # refuses a bad split before starting
                    tp, built.tp_workers = tp_workers.start_workers(settings)
                model = tp_workers.join(model, tp, device, settings.tensor_parallel_all_reduce)
                if tp.rank > 0:
                    built.follower = ModelRunner(
                        model, config.kv_blocks(), device, dtype, config.decode(model), sample=False
                    )
                    return built
                fanout = StepFanout(list(tp.steps))
            draft, draft_source = None, None
            if settings.draft_model is not None:  # small: served as loaded, in the engine's dtype
                loaded_draft = load_causal_lm(settings.draft_model, settings.cache_dir, dtype, settings.tokenizer)
                draft = Llama.from_hf(loaded_draft.config, loaded_draft.state_dict).to(device)
                draft_source = loaded_draft.source
            built.engine = LLMEngine(model, tokenizer, device, dtype, config, fanout, draft)
            built.engine.grammars.warm()  # the grammar library's token table takes seconds: not on a request
            served.gen_model_id = source.name
            gen_info: dict[str, object] = {"model": description, "load_seconds": _loaded("generate", start)}
            if draft_source is not None:
                gen_info["draft_model"] = draft_source
            served.info["generate"] = gen_info
        if settings.enable_classify:
            start = time.perf_counter()
            source = resolve_spec(settings.cls_model, "classify")
            center = None
            if source.kind == "checkpoint":
                enc = checkpoint.read_checkpoint(source.path, "classify", dtype, device)
                encoder = LoadedEncoder(enc.model, enc.tokenizer, enc.id2label, source.description)
                center = enc.center
                report = _checkpoint_report(enc.report_json, settings.cls_quantize)
                served.policy = policy = _as_checkpointed(policy, "cls_quantize", report)
            else:
                encoder = load_encoder(settings.cls_model, settings.cache_dir, dtype, None)
                encoder.model.to(device)
                spec = default_spec(policy.cls_quantize, settings.cls_prune, "classify")
                cache = settings.cache_dir if settings.compress_cache else None

                def embedder(enc: LoadedEncoder) -> Callable[[list[str]], torch.Tensor]:
                    return Classifier(enc, device).embed

                report = compress_encoder(encoder, spec, cache, embedder)
            served.reports["classify"] = report
            log.info("compression %s", report.summary())
            built.classifier = Classifier(encoder, device, max_batch=settings.cls_max_batch_size)
            if center is not None and not built.classifier.use_center(*center):
                log.info("the checkpoint's background center is for another background or pooling: recomputed")
            built.classifier.capture_graphs(settings.cls_max_batch_tokens)  # before the engines start
            served.cls_model_id = source.name
            served.info["classify"] = {"model": encoder.source, "load_seconds": _loaded("classify", start)}
            if encoder.head is not None:  # --cls-model HEAD_DIR: what /classify without labels answers with
                served.info["classify"]["model"] += f" with {resolve_spec(settings.cls_model, 'classify').description}"
        metrics.BUILD_INFO.labels(
            version=_package_version(),
            gen_model=served.info["generate"]["model"] if "generate" in served.info else "off",
            cls_model=served.info["classify"]["model"] if "classify" in served.info else "off",
            device=policy.device,
            dtype=policy.dtype,
        ).set(1)
        return built

    def warm_up(self) -> None:
        """One tiny generation and classification, on this thread, before serving (an engine core's way; the
        one-process server warms up through its running engine, Runtime.start): first-call costs happen here."""
        if self.engine is not None:
            start = time.perf_counter()
            self.engine.add(AddRequest(0, [0, 1, 2], SamplingParams(max_tokens=2), "warmup"))
            while self.engine.has_work():
                self.engine.step()
            metrics.WARMUP_SECONDS.labels(model="generate").set(time.perf_counter() - start)
        if self.classifier is not None:
            start = time.perf_counter()
            self.classifier.run([ClassifyItem("warm up", ("a", "b"), False, 4)])
            metrics.WARMUP_SECONDS.labels(model="classify").set(time.perf_counter() - start)

    def batcher(self, core: bool = False) -> Batcher:
        """A dynamic batcher over the classifier (not started: it starts on the loop that submits). An engine
        core's (``core``) runs a lone request's batch on its loop where the encoder is on CUDA: that loop serves
        nothing else meanwhile, and there the forward is a graph replay and a wait for the device, not CPU
        compute that the loop's thread would share (``DynamicBatcher``'s ``inline_items``)."""
        assert self.classifier is not None
        s = self.settings
        return DynamicBatcher(
            self.classifier.run,
            max_batch_size=s.cls_max_batch_size,
            max_batch_tokens=s.cls_max_batch_tokens,
            max_wait_ms=s.cls_max_wait_ms,
            max_queued=s.cls_max_queued_inputs,
            cost=lambda item: item.n_tokens,
            name="classify",
            inline_items=1 if core and self.classifier.device.type == "cuda" else 0,
        )

    def details(self) -> CoreDetails:
        return CoreDetails(
            tokenizer=self.engine.tokenizer if self.engine is not None else None,
            max_model_len=self.engine.max_model_len if self.engine is not None else 0,
            encoder=self.classifier.frontend() if self.classifier is not None else None,
            served=self.served,
        )


def _checkpoint_report(report_json: str, asked: str) -> CompressionReport:
    """The report a checkpoint was written with; a quantization asked for explicitly must be the one it has
    (pruning settings do not apply: the checkpoint's widths are fixed)."""
    report = CompressionReport.model_validate_json(report_json)
    report.checkpoint = True
    if asked != "auto" and asked != report.spec.quantize:
        raise ValueError(
            f"the {report.task} checkpoint is quantized {report.spec.quantize!r} but {asked!r} was asked for; "
            "leave the setting at auto or write another checkpoint (python -m models.compress)"
        )
    return report


def _as_checkpointed(policy: HardwarePolicy, name: str, report: CompressionReport) -> HardwarePolicy:
    """The policy as served: the quantization (and generation's pruning share) is the checkpoint's,
    whatever ``auto`` would pick here."""
    update: dict[str, object] = {name: report.spec.quantize}
    if name == "gen_quantize":
        update["gen_prune"] = report.spec.prune_mlp
    why = {**policy.why, **dict.fromkeys(update, "as written in the compressed checkpoint")}
    return policy.model_copy(update={**update, "why": why})


def _loaded(model: str, start: float) -> float:
    seconds = time.perf_counter() - start
    metrics.MODEL_LOAD_SECONDS.labels(model=model).set(seconds)
    return round(seconds, 2)


def freeze_heap() -> None:
    """Takes what starting up allocated (modules, models, tokenizers) out of the garbage collector's view,
    once a process is about to serve: a full collection would otherwise walk those hundreds of thousands of
    long-lived objects again and again, each time a pause that lands on whatever requests are in flight."""
    gc.collect()
    gc.freeze()


@dataclass
class Runtime:
    """What the routes serve from: the engines' clients and what the API side knows of the models. The
    engines run on threads of this process (:meth:`load`) or in engine-core processes (:meth:`connect`)."""

    settings: Settings
    device: str
    served: Served  # model ids, sources, compression reports and hardware policy, as the builder made them
    llm: LLMClient | None = None
    classifier: EncoderFrontend | None = None
    batcher: Batcher | CoreClient | None = None
    # Identical /classify inputs, keyed by (model id, text, labels, multi_label, threshold); None when disabled.
    cls_cache: ResponseCache[ClassifyKey, ClassResult] | None = None
    ready: bool = False
    created: int = field(default_factory=lambda: int(time.time()))  # unix time, /v1/models' `created`
    cores: CoreClient | None = None  # set when the engines run in engine-core processes

    def __post_init__(self) -> None:
        if self.classifier is not None and self.settings.cls_cache_size > 0:
            self.cls_cache = ResponseCache(self.settings.cls_cache_size, name="classify")

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Blocking: builds the engines to run on threads of this process. Run it off the event loop."""
        built = Engines.build(settings)
        return cls(
            settings=settings,
            device=built.served.policy.device,
            served=built.served,
            # A failed step turns /ready 503 from then on.
            llm=AsyncLLM(built.engine, on_error=lambda _: metrics.READY.set(0)) if built.engine else None,
            classifier=built.classifier,
            batcher=built.batcher() if built.classifier is not None else None,
        )

    @classmethod
    async def connect(cls, settings: Settings, cores: CoreClient, timeout: float) -> Runtime:
        """The runtime of an API-server process, over engine cores that are starting or running."""
        answers = await cores.connect(timeout)
        details: CoreDetails = pickle.loads(answers[0].details)  # from our own core process only
        llm = None
        if details.tokenizer is not None:
            llm = LLMClient(details.tokenizer, details.max_model_len, cores.send_generation, cores.api_index)
            cores.attach(llm)
        return cls(
            settings=settings,
            device=details.served.policy.device + ("" if len(answers) == 1 else f" x{len(answers)}"),
            served=details.served,
            llm=llm,
            classifier=details.encoder,
            batcher=cores if details.encoder is not None else None,
            cores=cores,
        )

    async def start(self) -> None:
        """Starts in-process engines on the running loop and warms them up; engine cores warm up themselves."""
        if isinstance(self.llm, AsyncLLM):
            self.llm.start()
            start = time.perf_counter()
            async for _ in self.llm.generate([0, 1, 2], SamplingParams(max_tokens=2), "warmup"):
                pass
            metrics.WARMUP_SECONDS.labels(model="generate").set(time.perf_counter() - start)
        if isinstance(self.batcher, DynamicBatcher):
            self.batcher.start()
            start = time.perf_counter()
            await self.batcher.submit(ClassifyItem("warm up", ("a", "b"), False, 4))
            metrics.WARMUP_SECONDS.labels(model="classify").set(time.perf_counter() - start)
        self.ready = True
        metrics.READY.set(1)
        log.info("ready on %s", self.device)
        if isinstance(self.llm, AsyncLLM):  # background compiling of decode steps (if the policy says so) from now
            self.llm.engine.start_compiling()

    @property
    def decode_compile(self) -> dict[str, object] | None:
        """Progress of compiling the decode steps after /ready (engine/cuda_graphs.py), where the policy compiles
        in the background and the engine runs in this process (engine cores: the metric
        ``llm_decode_compile_buckets``); None otherwise."""
        if self.served.policy.compile_decode != "background" or not isinstance(self.llm, AsyncLLM):
            return None
        return self.llm.engine.runner.decode.compile_progress()

    @property
    def failure(self) -> str | None:
        """Why the runtime cannot serve although it started (a generation step raised, an engine core
        died), or None. The message names only the error type: details are in the server log."""
        if self.cores is not None and self.cores.error is not None:
            return f"{self.cores.error}; see the server log"
        if self.llm is not None and self.llm.error is not None:
            return f"{self.llm.error}; see the server log"
        return None

    async def stop(self) -> None:
        self.ready = False
        metrics.READY.set(0)
        if isinstance(self.batcher, DynamicBatcher):
            await self.batcher.stop()
        if isinstance(self.llm, AsyncLLM):
            await asyncio.to_thread(self.llm.stop)
        if self.cores is not None:
            await self.cores.close()
