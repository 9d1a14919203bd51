"""``python -m models.compress``: compression as its own stage, ahead of serving.

Loads a model spec as the server would, compresses it (calibrate → prune → smooth → quantize → measure
fidelity on held-out text, models/compress.py) and writes a compressed checkpoint (models/checkpoint.py)
that ``--gen-model DIR`` / ``--cls-model DIR`` serve with no calibration::

    python -m models.compress --model default --out /models/gen
    python -m models.compress --task classify --model default --out /models/cls
    python -m models.compress --model dummy:smollm2-1.7b --device cuda --out /models/gen-1.7b

Compress on the kind of device that will serve (the methods differ: int8 w8a8 on CPU, int8 weight-only on
CUDA) and in its dtype. An existing checkpoint made from the same model and settings is kept (``--force``
rewrites it), so an init job can run this on every rollout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from models import checkpoint
from models.compress import (
    CompressionReport,
    CompressionSpec,
    compress_causal_lm,
    compress_encoder,
    default_spec,
)
from models.cpu_policy import CUDA_GEN_PRUNE, cpu_policy
from models.llama import Llama
from models.loader import LoadedEncoder, load_causal_lm, load_encoder

log = logging.getLogger("models.compress")

METHODS = ("none", "int8", "int8-wo", "fp8")
# The server's defaults where each measured best (server/config.py, server/hardware.py and
# load_tests/results/compression/README.md#decisions): the stage must not decide policy of its own. On CPU,
# generation takes what models/cpu_policy.py picks for this CPU, as the server's 'auto' does.
DEFAULT_QUANTIZE = {("generate", "cuda"): "int8-wo"}
DEFAULT_PRUNE = {("generate", "cuda"): CUDA_GEN_PRUNE}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.compress", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="model spec as for the server: default, a HF dir, a .gguf, dummy:")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write (new, empty or a checkpoint)")
    p.add_argument("--task", choices=("generate", "classify"), default="generate", help="default: generate")
    p.add_argument(
        "--quantize",
        choices=METHODS,
        help="default: the server's 'auto' for the device: for generation int8 on CPU, int8-wo on CUDA; "
        "none for classification",
    )
    p.add_argument(
        "--prune",
        type=float,
        help="share of MLP channels removed; default: the server's, for generation 0.005 on CPU and 0.01 on "
        "CUDA; 0 for classification",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on CPU, else bf16")
    p.add_argument("--tokenizer", help="tokenizer directory or .gguf overriding the model's (dummy models)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("LLM_CACHE_DIR", Path.home() / ".cache" / "lowlat-server")),
        help="converted-GGUF and compression cache (the server's cache_dir; default $LLM_CACHE_DIR or "
        "~/.cache/lowlat-server)",
    )
    p.add_argument(
        "--no-compress-cache", action="store_true", help="recompute even if the server's cache holds the result"
    )
    p.add_argument("--force", action="store_true", help="rewrite --out even if it was made from the same settings")
    args = p.parse_args(argv)
    if args.prune is not None and not 0.0 <= args.prune < 1.0:
        p.error("--prune must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    method = args.quantize or default_quantize(args.task, device)
    prune = default_prune(args.task, device) if args.prune is None else args.prune
    spec = default_spec(method, prune, args.task)
    cache = None if args.no_compress_cache else args.cache_dir
    written = compress(args, spec, device, dtype, cache)
    if written is None:
        print(f"{args.out}: already a checkpoint of the same model and settings (--force rewrites it)")
    else:
        print(written.summary())
    return 0


def default_quantize(task: str, device: torch.device) -> str:
    if task == "generate" and device.type == "cpu":
        return cpu_policy().quantize
    return DEFAULT_QUANTIZE.get((task, device.type), "none")


def default_prune(task: str, device: torch.device) -> float:
    if task == "generate" and device.type == "cpu":
        return cpu_policy().prune_mlp
    return DEFAULT_PRUNE.get((task, device.type), 0.0)


def _up_to_date(out: Path, made_from: dict[str, object]) -> bool:
    return checkpoint.is_checkpoint(out) and checkpoint.read_marker(out).get("made_from") == made_from


def _made_from(source: str, spec: CompressionSpec, device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    return {"model": source, "spec": spec.model_dump(mode="json"), "device": device.type, "dtype": str(dtype)}


def compress(
    args: argparse.Namespace, spec: CompressionSpec, device: torch.device, dtype: torch.dtype, cache: Path | None
) -> CompressionReport | None:
    """Load ``args.model`` for ``args.task``, compress it and write the checkpoint; None when ``args.out``
    already holds one made from the same model and settings."""
    load = load_causal_lm if args.task == "generate" else load_encoder
    loaded = load(args.model, args.cache_dir, dtype, args.tokenizer)
    made_from = _made_from(loaded.source, spec, device, dtype)
    if args.task == "classify":  # a checkpoint whose center is stale (or missing) is written again
        from engine.classifier import center_key

        made_from["center_key"] = center_key()
    if not args.force and _up_to_date(args.out, made_from):
        return None
    center = None
    if isinstance(loaded, LoadedEncoder):
        model, config = loaded.model.to(device), loaded.model.config
        report = compress_encoder(loaded, spec, cache, _served_embedding(device))
        plan = checkpoint.encoder_plan(model, report.intermediate_sizes)
        served_center = _served_center(loaded, device)
        center = None if served_center is None else (served_center, made_from["center_key"])
    else:
        model, config = Llama.from_hf(loaded.config, loaded.state_dict).to(device), loaded.config
        model, report = compress_causal_lm(model, config, loaded.tokenizer, spec, loaded.source, cache)
        plan = checkpoint.llama_plan(model)
    report = report.model_copy(update={"cached": False})
    report_json = report.model_dump_json(indent=2)
    checkpoint.write_checkpoint(
        args.out, args.task, model, plan, config, loaded.tokenizer, report_json, made_from, center
    )
    return report


def _served_embedding(device: torch.device) -> Callable[[LoadedEncoder], Callable[[list[str]], torch.Tensor]]:
    """The embedding /classify computes, so the fidelity measured is the served one (an offline tool may
    use the engine; the serving side never imports this module)."""
    from engine.classifier import Classifier

    return lambda enc: Classifier(enc, device).embed


def _served_center(encoder: LoadedEncoder, device: torch.device) -> torch.Tensor | None:
    """The compressed classifier's background center as the server computes it (engine/classifier.py), stored
    so that a replica serving the checkpoint does not embed the background at startup."""
    from engine.classifier import Classifier

    return Classifier(encoder, device).center()
