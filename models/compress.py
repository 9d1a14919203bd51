"""Startup compression: calibrate → prune → smooth → quantize → measure fidelity, cached on disk.

``compress_causal_lm`` and ``compress_encoder`` are the only entry points (server/runtime.py calls
them). The result of a (source, settings) pair is cached under ``cache_dir`` as safetensors + a plan
(module shapes and which layers are quantized) + the report, so a restart rebuilds the compressed
model directly instead of recalibrating. Reports are pydantic models so the HTTP layer can serve them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from transformers import PretrainedConfig

from models import calibration as calib
from models import checkpoint
from models.fidelity import encoder_agreement, evaluate_encoder, evaluate_lm, top1_agreement
from models.llama import Llama
from models.loader import LoadedEncoder
from models.prune import allocate_widths, prune_mlp
from models.quantize import (
    QuantEmbedding,
    QuantMethod,
    fuse_quantized_projections,
    quantize_modules,
    smooth_into_linear,
    smooth_into_norm,
)

log = logging.getLogger("models.compress")

CACHE_FORMAT_VERSION = 2
CALIB_WINDOW = 256  # tokens per calibration / evaluation window (generation)


class CompressionSpec(BaseModel):
    """What to do to one model. ``quantize='none'`` and ``prune_mlp=0`` leave it untouched."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantize: QuantMethod = "none"
    prune_mlp: float = Field(0.0, ge=0.0, lt=1.0, description="share of MLP intermediate channels removed")
    prune_allocation: Literal["uniform", "global"] = Field(
        "global", description="same share in every layer, or the globally least important channels"
    )
    reconstruct: bool = Field(True, description="least-squares refit of the pruned down projections")
    smooth_alpha: float | None = Field(
        None, ge=0.0, le=1.0, description="SmoothQuant migration strength (generation models; None = off)"
    )
    keep_float: tuple[str, ...] = Field((), description="glob patterns of Linear layers left unquantized")
    calib_tokens: int = Field(4096, ge=64, description="calibration tokens (generation)")
    eval_tokens: int = Field(1024, ge=0, description="held-out tokens for the startup fidelity check")

    @property
    def is_identity(self) -> bool:
        return self.quantize == "none" and self.prune_mlp == 0.0


def default_spec(method: str, prune_mlp: float, task: Literal["generate", "classify"] = "generate") -> CompressionSpec:
    """A method with its measured best companions (load_tests/results/compression/README.md)."""
    extra = GENERATE_METHOD_DEFAULTS.get(method, {}) if task == "generate" else {}
    return CompressionSpec(quantize=method, prune_mlp=prune_mlp, **extra)  # type: ignore[arg-type]


GENERATE_METHOD_DEFAULTS: dict[str, dict[str, object]] = {
    # The most faithful alpha of the sweep in load_tests/results/compression/README.md#decisions.
    "int8": {"smooth_alpha": 0.5},
}


class CompressionReport(BaseModel):
    """What was done to a model and what it cost in fidelity, as logged at startup and served by /info."""

    task: Literal["generate", "classify"]
    model: str
    spec: CompressionSpec
    quantized_layers: int = Field(description="Linear and vocabulary Embedding modules now holding 8-bit weights")
    float_layers: list[str]
    intermediate_sizes: list[int]
    weight_bytes_before: int
    weight_bytes_after: int
    weight_bytes_cut: float = Field(description="1 - after/before")
    fidelity: dict[str, float] = Field(
        description="generation: perplexity_before/after, perplexity_change, top1_agreement, eval_tokens; "
        "classification: embedding_cosine, label_agreement, accuracy_before/after, inputs"
    )
    seconds: float = Field(description="time the compression took when it was computed")
    cached: bool = Field(False, description="loaded from the on-disk cache at this start")
    checkpoint: bool = Field(
        False, description="served from a compressed checkpoint (python -m models.compress); fidelity as measured then"
    )

    def summary(self) -> str:
        fid = ", ".join(f"{k}={v:.4g}" for k, v in self.fidelity.items())
        return (
            f"{self.task}: quantize={self.spec.quantize} prune_mlp={self.spec.prune_mlp} "
            f"weights {self.weight_bytes_before / 2**20:.1f} -> {self.weight_bytes_after / 2**20:.1f} MiB "
            f"(-{100 * self.weight_bytes_cut:.1f}%), {fid}{' (cached)' if self.cached else ''}"
            f"{' (compressed checkpoint)' if self.checkpoint else ''}"
        )


# ------------------------------------------------------------------------------------------ generation


def compress_causal_lm(
    model: Llama,
    config: PretrainedConfig,
    tokenizer: object,
    spec: CompressionSpec,
    source: str,
    cache_dir: Path | None,
) -> tuple[Llama, CompressionReport]:
    """Compress ``model`` (already on its device and dtype) per ``spec``; returns the model to serve.

    On a cache hit the returned model is rebuilt from the cache and ``model`` is discarded.
    """
    before = weight_bytes(model)
    start = time.perf_counter()
    entry = _cache_entry(cache_dir, "generate", source, spec, model)
    if entry is not None and (entry / "report.json").is_file():
        cached = _load_llama(entry, config, model)
        report = CompressionReport.model_validate_json((entry / "report.json").read_text())
        report.cached = True
        return cached, report
    fidelity: dict[str, float] = {}
    eval_windows = calib.token_windows(tokenizer, calib.read_text(calib.EVAL_TEXT), spec.eval_tokens, CALIB_WINDOW)
    reference = evaluate_lm(model, eval_windows) if eval_windows and not spec.is_identity else None

    stats = None
    if spec.prune_mlp > 0 or spec.smooth_alpha is not None:
        windows = calib.token_windows(
            tokenizer, calib.read_text(calib.CALIBRATION_TEXT), spec.calib_tokens, CALIB_WINDOW
        )
        grams = [f"layers.{i}.mlp.down_proj" for i in range(len(model.layers))] if spec.prune_mlp > 0 else []
        stats = calib.collect(model, windows, calib.forward_sequence, gram_for=grams).stats
    widths = [layer.mlp.down_proj.in_features for layer in model.layers]
    if spec.prune_mlp > 0:
        assert stats is not None
        downs = [layer.mlp.down_proj for layer in model.layers]
        widths = allocate_widths(downs, [stats[n].gram for n in grams], spec.prune_mlp, spec.prune_allocation)
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        down_absmax = stats[f"layers.{i}.mlp.down_proj"].absmax if stats else None
        if widths[i] < mlp.down_proj.in_features:
            assert stats is not None
            gram = stats[f"layers.{i}.mlp.down_proj"].gram
            assert gram is not None
            keep = widths[i]
            (mlp.gate_proj, mlp.up_proj), mlp.down_proj, idx = prune_mlp(
                [mlp.gate_proj, mlp.up_proj], mlp.down_proj, gram, keep, spec.reconstruct
            )
            assert down_absmax is not None
            down_absmax = down_absmax[idx.to(down_absmax.device)]
            stats[f"layers.{i}.mlp.down_proj"].gram = None  # free it
        if spec.smooth_alpha is not None and spec.quantize != "none":
            assert stats is not None and down_absmax is not None
            attn, a = layer.self_attn, spec.smooth_alpha
            smooth_into_norm(
                layer.input_layernorm.weight.data,
                [attn.q_proj, attn.k_proj, attn.v_proj],
                stats[f"layers.{i}.self_attn.q_proj"].absmax,
                a,
            )
            smooth_into_norm(
                layer.post_attention_layernorm.weight.data,
                [mlp.gate_proj, mlp.up_proj],
                stats[f"layers.{i}.mlp.gate_proj"].absmax,
                a,
            )
            smooth_into_linear(mlp.up_proj, mlp.down_proj, down_absmax, a)
    del stats

    tied = model.args.tie_word_embeddings
    names = quantize_modules(model, spec.quantize, keep=lambda n: _matches(n, spec.keep_float), embeddings=not tied)
    if tied and "lm_head" in names:
        model.embed_tokens = QuantEmbedding.tied_to(model.lm_head, model.norm.weight.dtype)  # type: ignore[arg-type]
        names.append("embed_tokens")
    fuse_quantized_projections(model)
    if reference is not None:
        after = evaluate_lm(model, eval_windows)
        fidelity = {
            "perplexity_before": reference.perplexity,
            "perplexity_after": after.perplexity,
            "perplexity_change": after.perplexity / reference.perplexity - 1.0,
            "top1_agreement": top1_agreement(reference, after),
            "eval_tokens": float(after.tokens),
        }
    sizes = [layer.mlp.down_proj.in_features for layer in model.layers]
    report = _report("generate", source, spec, model, names, sizes, before, fidelity, start)
    if entry is not None:
        _save(entry, model, {"names": names, "method": spec.quantize, "intermediate_sizes": sizes}, report)
    return model, report


def _load_llama(entry: Path, config: PretrainedConfig, like: Llama) -> Llama:
    plan = {"qkv_bias": like.layers[0].self_attn.q_proj.bias is not None, **checkpoint.read_plan(entry)}
    return checkpoint.build_llama(entry, config, like.norm.weight.dtype, like.norm.weight.device, plan)


# ------------------------------------------------------------------------------------------ classification


def compress_encoder(
    encoder: LoadedEncoder,
    spec: CompressionSpec,
    cache_dir: Path | None,
    embedder: Callable[[LoadedEncoder], Callable[[list[str]], Tensor]],
) -> CompressionReport:
    """Compress ``encoder.model`` in place per ``spec`` (BERT-style layers: ``intermediate.dense`` →
    ``output.dense`` MLPs). ``embedder`` builds the sentence-embedding function the classifier uses,
    so fidelity is measured on exactly what /classify computes."""
    model = encoder.model
    before = weight_bytes(model)
    start = time.perf_counter()
    entry = _cache_entry(cache_dir, "classify", encoder.source, spec, model)
    if entry is not None and (entry / "report.json").is_file():
        _load_encoder_into(entry, model)
        report = CompressionReport.model_validate_json((entry / "report.json").read_text())
        report.cached = True
        return report
    texts, gold, descriptions = calib.read_intents()
    reference = evaluate_encoder(embedder(encoder), texts, gold, descriptions) if not spec.is_identity else None
    mlps = _encoder_mlps(model)
    if spec.prune_mlp > 0:
        lines = [ln for ln in calib.read_text(calib.CALIBRATION_TEXT).splitlines() if ln.strip()]
        dev = next(model.parameters()).device

        def run(m: nn.Module, line: str) -> None:
            enc = encoder.tokenizer(line, return_tensors="pt", truncation=True, max_length=128)
            m(**{k: v.to(dev) for k, v in enc.items()})

        grams = [f"{n}.output.dense" for n, _ in mlps]
        stats = calib.collect(model, lines, run, gram_for=grams).stats
        downs = [layer.output.dense for _, layer in mlps]
        widths = allocate_widths(downs, [stats[n].gram for n in grams], spec.prune_mlp, spec.prune_allocation)
        for (name, layer), keep in zip(mlps, widths, strict=True):
            inter, out = layer.intermediate, layer.output
            gram = stats[f"{name}.output.dense"].gram
            assert gram is not None
            (inter.dense,), out.dense, _ = prune_mlp([inter.dense], out.dense, gram, keep, spec.reconstruct)
        del stats
    names = quantize_modules(model, spec.quantize, keep=lambda n: _matches(n, spec.keep_float))
    fidelity: dict[str, float] = {}
    if reference is not None:
        after = evaluate_encoder(embedder(encoder), texts, gold, descriptions)
        cos, agree = encoder_agreement(reference, after)
        fidelity = {
            "embedding_cosine": cos,
            "label_agreement": agree,
            "accuracy_before": reference.accuracy,
            "accuracy_after": after.accuracy,
            "inputs": float(len(texts)),
        }
    sizes = [layer.output.dense.in_features for _, layer in mlps]
    report = _report("classify", encoder.source, spec, model, names, sizes, before, fidelity, start)
    if entry is not None:
        _save(entry, model, {"names": names, "method": spec.quantize, "intermediate_sizes": sizes}, report)
    return report


def _encoder_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear)
        and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear)
    ]


def _load_encoder_into(entry: Path, model: nn.Module) -> None:
    checkpoint.load_encoder_weights(entry, model, checkpoint.read_plan(entry))


# ------------------------------------------------------------------------------------------ helpers


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and persistent buffer (tied tensors count once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _report(
    task: Literal["generate", "classify"],
    source: str,
    spec: CompressionSpec,
    model: nn.Module,
    names: list[str],
    sizes: list[int],
    before: int,
    fidelity: dict[str, float],
    start: float,
) -> CompressionReport:
    after = weight_bytes(model)
    float_layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # left unquantized
    return CompressionReport(
        task=task,
        model=source,
        spec=spec,
        quantized_layers=len(names),
        float_layers=float_layers if spec.quantize != "none" else [],
        intermediate_sizes=sizes,
        weight_bytes_before=before,
        weight_bytes_after=after,
        weight_bytes_cut=1.0 - after / before,
        fidelity=fidelity,
        seconds=round(time.perf_counter() - start, 2),
    )


def _cache_entry(
    cache_dir: Path | None, task: str, source: str, spec: CompressionSpec, model: nn.Module
) -> Path | None:
    """Cache directory for (source, spec, device type, dtype); None when caching is off or nothing is done."""
    if cache_dir is None or spec.is_identity:
        return None
    p = next(model.parameters())
    ident = json.dumps(
        {
            "v": CACHE_FORMAT_VERSION,
            "task": task,
            "source": source,
            "spec": spec.model_dump(mode="json"),
            "device": p.device.type,
            "dtype": str(p.dtype),
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return Path(cache_dir).expanduser() / f"compressed-{task}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _save(entry: Path, model: nn.Module, plan: dict[str, object], report: CompressionReport) -> None:
    """Write the entry to a temp dir and rename it into place (no half-written entries)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        checkpoint.write_weights(tmp, model, plan)
        (tmp / checkpoint.REPORT).write_text(report.model_dump_json(indent=2))
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(tmp, entry)
        log.info("compressed weights cached in %s", entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":  # python -m models.compress: the offline stage writing a compressed checkpoint
    from models.compress_cli import main

    raise SystemExit(main())
