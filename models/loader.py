"""Load config + weights + tokenizer for the generation and classification models.

Generation models are returned as a plain HF-named state dict (not an HF module) because the engine
runs its own paged-KV decoder (models/llama.py); encoders are returned as HF modules because the
classifier runs them as-is.

GGUF files are dequantized by transformers once (the slow part of a first start) and the result is
cached as an ordinary HF directory (safetensors + tokenizer with its chat template), so later starts
take a few seconds and go through exactly the same code path as any local HF directory.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import Tensor

# The auto model and tokenizer classes are reached through ``transformers.`` where used: importing them pulls
# transformers' auto-model machinery, seconds of imports on some versions, which a server of checkpoints never needs.
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from models.classifier_head import ClassifierHead
from models.llama import SUPPORTED_MODEL_TYPES
from models.sources import dummy_config, embedded_encoder_dir, embedded_gguf_path, resolve_spec

logger = logging.getLogger("models.loader")

GGUF_CACHE_FORMAT_VERSION = 2
"""Bump when the layout or content of a converted GGUF cache entry changes; old entries are then ignored."""

CONVERSION_MARKER = "lowlat_conversion.json"
"""Written into every converted cache entry; records where it came from (useful when debugging)."""

DUMMY_SEED = 0


@dataclass
class LoadedCausalLM:
    """A generation model as the engine consumes it."""

    config: PretrainedConfig  # HF config (llama / mistral / qwen2 family)
    state_dict: dict[str, Tensor]  # HF parameter names, in the requested dtype; lm_head.weight always present
    tokenizer: PreTrainedTokenizerBase
    source: str  # human-readable description of where it came from


@dataclass
class LoadedEncoder:
    """A classification / embedding model as the classifier consumes it."""

    model: torch.nn.Module  # HF AutoModel, or AutoModelForSequenceClassification when the dir has a head
    tokenizer: PreTrainedTokenizerBase
    id2label: dict[int, str] | None  # None when the model has no classification head
    source: str
    head: ClassifierHead | None = None  # a trained head over the embeddings (--cls-model HEAD_DIR)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def load_causal_lm(spec: str, cache_dir: Path, dtype: torch.dtype, tokenizer: str | None = None) -> LoadedCausalLM:
    """Load a generation model from a spec (see models/sources.py) into a state dict of ``dtype``.

    ``tokenizer`` (a tokenizer/model directory or a .gguf file) overrides the model's own tokenizer;
    dummy models otherwise get the embedded SmolLM2 tokenizer.
    """
    cache_dir = Path(cache_dir)
    source = resolve_spec(spec, "generate")
    logger.info("loading generation model from %s at %s (dtype %s)", source.description, source.path, dtype)
    start = time.perf_counter()
    description = source.description
    if source.kind == "gguf":
        assert source.path is not None
        model_dir = ensure_gguf_converted(source.path, cache_dir)
        config, state_dict = read_causal_lm_dir(model_dir, dtype)
        default_tokenizer_dir: Path | None = model_dir
        description = f"{description} (converted copy {model_dir.name})"
    elif source.kind == "hf_dir":
        assert source.path is not None
        config, state_dict = read_causal_lm_dir(source.path, dtype)
        default_tokenizer_dir = source.path
    else:
        config = dummy_config(source)
        check_causal_config(config, source.description)
        state_dict = random_causal_state_dict(config, dtype)
        default_tokenizer_dir = None  # resolved below only if no override, to avoid a needless conversion

    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, cache_dir)
    else:
        if default_tokenizer_dir is None:
            default_tokenizer_dir = ensure_gguf_converted(embedded_gguf_path(), cache_dir)
        tok = _tokenizer_from_dir(default_tokenizer_dir)
    _check_vocab(config, tok, strict=source.kind == "dummy", what=description)

    n_params = sum(t.numel() for name, t in state_dict.items() if not _is_tied_alias(config, name))
    logger.info(
        "loaded generation model %s: %s, %.1fM params, %d tensors in %.2f s",
        description,
        config.model_type,
        n_params / 1e6,
        len(state_dict),
        time.perf_counter() - start,
    )
    return LoadedCausalLM(config=config, state_dict=state_dict, tokenizer=tok, source=description)


def load_encoder(spec: str, cache_dir: Path, dtype: torch.dtype, tokenizer: str | None = None) -> LoadedEncoder:
    """Load an encoder (embeddings / classification head) as an HF module in eval mode and ``dtype``.

    A directory whose config ``architectures`` names a ``*ForSequenceClassification`` class is loaded
    with its head and ``id2label``; anything else is loaded as a bare ``AutoModel`` (id2label None),
    because every config carries a default id2label that means nothing without a trained head.
    """
    cache_dir = Path(cache_dir)
    source = resolve_spec(spec, "classify")
    if source.kind == "head_dir":  # its encoder, then the head; the source stays the encoder's (compression cache)
        assert source.path is not None
        head = ClassifierHead.load(source.path)
        loaded = load_encoder(head.encoder_spec(source.path), cache_dir, dtype, tokenizer)
        if loaded.id2label is not None or loaded.head is not None:
            raise ValueError(f"{source.description}: its encoder {head.encoder!r} has a head of its own")
        width = int(getattr(loaded.model.config, "hidden_size", 0))
        if head.dim not in (width, 2 * width):  # its pooled features, or (older heads) the embedding alone
            raise ValueError(f"{source.description}: head of width {head.dim} for an encoder of width {width}")
        logger.info("classifier head %s: %d labels", source.description, len(head.labels))
        loaded.head = head
        return loaded
    logger.info("loading encoder from %s at %s (dtype %s)", source.description, source.path, dtype)
    start = time.perf_counter()
    if source.kind == "gguf":
        raise ValueError(f"GGUF encoders are not supported ({source.description}); use a HF model directory")
    if source.kind == "hf_dir":
        assert source.path is not None
        config = AutoConfig.from_pretrained(source.path, local_files_only=True)
        has_head = _has_classification_head(config)
        auto_cls = transformers.AutoModelForSequenceClassification if has_head else transformers.AutoModel
        model = auto_cls.from_pretrained(source.path, dtype=dtype, local_files_only=True)
        default_tokenizer_dir = source.path
    else:
        config = dummy_config(source)
        has_head = _has_classification_head(config)
        auto_cls = transformers.AutoModelForSequenceClassification if has_head else transformers.AutoModel
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DUMMY_SEED)
            model = auto_cls.from_config(config)
        model = model.to(dtype)
        default_tokenizer_dir = None  # the embedded encoder's, looked up only without an override
    model.eval()

    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, cache_dir)
    else:
        tok = _tokenizer_from_dir(default_tokenizer_dir or embedded_encoder_dir())
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()} if has_head else None
    logger.info(
        "loaded encoder %s: %s%s in %.2f s",
        source.description,
        type(model).__name__,
        f" with {len(id2label)} labels" if id2label else "",
        time.perf_counter() - start,
    )
    return LoadedEncoder(model=model, tokenizer=tok, id2label=id2label, source=source.description)


def load_tokenizer(spec: str, cache_dir: Path) -> PreTrainedTokenizerBase:
    """Load a ``--tokenizer`` override: a directory holding tokenizer files, or a .gguf file."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return _tokenizer_from_dir(ensure_gguf_converted(path.resolve(), Path(cache_dir)))
    if path.is_dir():
        return _tokenizer_from_dir(path)
    raise ValueError(f"tokenizer {spec!r} is neither a directory with tokenizer files nor a .gguf file")


# --------------------------------------------------------------------------------------------------
# Local HF directories (also the format of converted GGUF cache entries)
# --------------------------------------------------------------------------------------------------


def check_causal_config(config: PretrainedConfig, what: str) -> None:
    """Reject model families the engine's decoder does not implement, before any heavy work."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {config.model_type!r} for generation ({what}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def read_causal_lm_dir(model_dir: Path, dtype: torch.dtype) -> tuple[PretrainedConfig, dict[str, Tensor]]:
    """Config + HF-named state dict of a local causal-LM directory, tensors cast to ``dtype``.

    Reads safetensors directly when present (no HF module is built: faster and half the peak
    memory); falls back to AutoModelForCausalLM for .bin checkpoints or unusual key layouts.
    """
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_causal_config(config, str(model_dir))
    state_dict = _read_safetensors_dir(model_dir, dtype)
    if state_dict is None or "model.embed_tokens.weight" not in state_dict:
        logger.info("reading %s through AutoModelForCausalLM (no plain safetensors checkpoint)", model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        state_dict = {k: v.detach() for k, v in model.state_dict().items()}
        del model
    state_dict = {k: _cast(v, dtype) for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if _tied(config):
        # Consumers always find lm_head.weight; with tied embeddings it *is* the embedding tensor.
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    elif "lm_head.weight" not in state_dict:
        raise ValueError(f"{model_dir}: checkpoint has no lm_head.weight and tie_word_embeddings is false")
    return config, state_dict


def _read_safetensors_dir(model_dir: Path, dtype: torch.dtype) -> dict[str, Tensor] | None:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        return None
    state_dict: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                state_dict[key] = _cast(f.get_tensor(key), dtype)
    return state_dict


def _tokenizer_from_dir(path: Path) -> PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


# --------------------------------------------------------------------------------------------------
# GGUF conversion cache
# --------------------------------------------------------------------------------------------------


def gguf_cache_key(gguf_path: Path) -> str:
    """Cache entry name for a GGUF file: changes whenever the file (path, size, mtime) or format does."""
    gguf_path = Path(gguf_path).resolve()
    st = gguf_path.stat()
    ident = f"v{GGUF_CACHE_FORMAT_VERSION}|{gguf_path}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gguf_path.stem)[:64]
    return f"gguf-{stem}-{digest}"


def ensure_gguf_converted(gguf_path: Path, cache_dir: Path) -> Path:
    """Return the cached HF directory for ``gguf_path``, converting it first on a cache miss.

    The conversion is written to a temp dir inside ``cache_dir`` and renamed into place, so a crash
    never leaves a half-written entry; a file lock keeps concurrent processes from converting twice.
    """
    gguf_path = Path(gguf_path).resolve()
    cache_dir = Path(cache_dir).expanduser()
    key = gguf_cache_key(gguf_path)
    final = cache_dir / key
    if _is_complete_entry(final):
        logger.info("GGUF cache hit: %s -> %s", gguf_path.name, final)
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{key}.lock"):
        if _is_complete_entry(final):  # another process converted it while we waited
            logger.info("GGUF cache hit (after waiting for another converter): %s", final)
            return final
        logger.info("GGUF cache miss: converting %s (takes ~20-30 s, once) into %s", gguf_path, final)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
        try:
            _convert_gguf_to_dir(gguf_path, tmp)
            st = gguf_path.stat()
            marker = {
                "format_version": GGUF_CACHE_FORMAT_VERSION,
                "source": str(gguf_path),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "seconds": round(time.perf_counter() - start, 2),
            }
            (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
            if final.exists():  # an incomplete leftover (not ours: ours are only ever renamed in)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("GGUF conversion of %s finished in %.1f s", gguf_path.name, time.perf_counter() - start)
    return final


def _convert_gguf_to_dir(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as a plain HF directory (fp32 safetensors)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    check_causal_config(model.config, str(gguf_path))
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    _align_special_tokens(tok, model.config, str(gguf_path))
    # Byte-level BPE must decode verbatim; the WordPiece-era "clean up spaces" step would corrupt text.
    tok.clean_up_tokenization_spaces = False
    # The weights are already dequantized plain tensors; only the quantizer bookkeeping makes
    # save_pretrained refuse ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)  # keeps the chat template (chat_template.jinja)


def _align_special_tokens(tok: PreTrainedTokenizerBase, config: PretrainedConfig, what: str) -> None:
    """Make the tokenizer's bos/eos/pad agree with the ids in the GGUF-derived model config.

    transformers 5.17 builds the SmolLM2 GGUF tokenizer with eos = <|im_start|> (id 1) and no pad,
    while the GGUF metadata (and so the config) says eos = 2 = <|im_end|>; a wrong eos would make
    generation run past the end of every chat turn. 5.23 already gets this right (then a no-op).
    """
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if not isinstance(token_id, int) or not 0 <= token_id < len(tok):
            continue
        if getattr(tok, f"{role}_token_id", None) != token_id:
            token = tok.convert_ids_to_tokens(token_id)
            logger.warning(
                "%s: tokenizer %s_token %r disagrees with config %s_token_id=%d; using %r",
                what,
                role,
                getattr(tok, f"{role}_token", None),
                role,
                token_id,
                token,
            )
            setattr(tok, f"{role}_token", token)


def _is_complete_entry(path: Path) -> bool:
    return (path / CONVERSION_MARKER).is_file() and (path / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Dummy (random) weights
# --------------------------------------------------------------------------------------------------


def random_causal_state_dict(config: PretrainedConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Deterministic random weights for ``config``, generated directly in ``dtype``.

    Names and shapes come from an HF model instantiated on the meta device (no memory, no init).
    Matrices ~ N(0, initializer_range), 1-D weights (norms) = 1, biases = 0. Each tensor has its own
    generator seeded from DUMMY_SEED and its name, so tensors are generated in parallel threads
    (torch releases the GIL) and the result does not depend on thread scheduling: a 1.7B model
    takes seconds, not the minutes an fp32 HF module with its init would.
    """
    start = time.perf_counter()
    with torch.device("meta"):
        meta_model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config))
    shapes = {name: tuple(t.shape) for name, t in meta_model.state_dict().items()}
    del meta_model
    std = float(getattr(config, "initializer_range", 0.02))
    names = [n for n in shapes if not _is_tied_alias(config, n) and not n.endswith("rotary_emb.inv_freq")]

    def make(name: str) -> Tensor:
        shape = shapes[name]
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=dtype)
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype)
        gen = torch.Generator().manual_seed(DUMMY_SEED + zlib.crc32(name.encode()))
        return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)

    workers = max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        state_dict = dict(zip(names, pool.map(make, names), strict=True))
    if _tied(config):
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    n_params = sum(t.numel() for n, t in state_dict.items() if not _is_tied_alias(config, n))
    logger.info("generated %.1fM random parameters (%s) in %.2f s", n_params / 1e6, dtype, time.perf_counter() - start)
    return state_dict


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _tied(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _is_tied_alias(config: PretrainedConfig, name: str) -> bool:
    return name == "lm_head.weight" and _tied(config)


def _has_classification_head(config: PretrainedConfig) -> bool:
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


def _check_vocab(config: PretrainedConfig, tok: PreTrainedTokenizerBase, strict: bool, what: str) -> None:
    """A tokenizer emitting ids >= vocab_size would crash the embedding lookup mid-request; catch it now."""
    if len(tok) <= config.vocab_size:
        return
    msg = f"tokenizer has {len(tok)} tokens but the model vocab_size is {config.vocab_size} ({what})"
    if strict:
        raise ValueError(msg + "; pass a matching tokenizer")
    logger.warning(msg)
