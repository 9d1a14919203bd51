"""Compressed checkpoints: a model already pruned and quantized, in a directory the server serves as is.

``python -m models.compress`` (models/compress_cli.py) writes one; ``--gen-model DIR`` / ``--cls-model DIR``
serves it without calibration. A checkpoint directory holds:

- ``model.safetensors``: the state dict as served: quantized layers as their saved 8-bit ``qweight`` and
  float32 ``scale`` (never re-quantized on load), float layers in the dtype they were compressed in;
- ``plan.json``: what to rebuild before loading: the quantized module names, the method, each layer's
  (possibly pruned) MLP width, tensors stored once under another name (tied embeddings); for generation the
  model's dimensions, and the tokenizer's class: read without transformers' Llama config, whose module imports
  its modeling stack (part of a CPU replica's start: load_tests/results/ready_time/README.md);
- ``report.json``: the compression report with the fidelity measured when it was written (served by /info);
- ``config.json`` and the tokenizer files (with the chat template), so nothing else is needed;
- ``center.safetensors`` (classification): the classifier's background center as computed when written, with the
  key it was computed under (engine/classifier.py ``Classifier.center_key``), so that a replica does not embed
  the background at startup; served only under the same key;
- ``lowlat_checkpoint.json``: the marker (format version, task, what it was made from), written last: its
  presence means the directory is complete.

The startup compression cache (models/compress.py) stores its entries with the same weight files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from models.bert import Bert, BertArgs
from models.llama import Llama, ModelArgs, rope_tables
from models.quantize import QuantEmbedding, QuantLinear, fuse_quantized_projections, install_quant_modules

log = logging.getLogger("models.checkpoint")

MARKER = "lowlat_checkpoint.json"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
PLAN = "plan.json"
REPORT = "report.json"
CENTER = "center.safetensors"
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""Fused quantized projections (models/quantize.py ``fuse_quantized_projections``) and the parts they replace."""

Task = Literal["generate", "classify"]


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    marker = json.loads((Path(path) / MARKER).read_text())
    if marker.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {marker.get('format_version')!r}, this server reads {FORMAT_VERSION}; "
            "write it again with python -m models.compress"
        )
    return marker


# ------------------------------------------------------------------------------------------ weights


def write_weights(directory: Path, model: nn.Module, plan: dict[str, Any]) -> None:
    """``model``'s state dict (each shared tensor once, the others recorded as aliases) and its plan."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in by_storage:
            aliases[name] = by_storage[key]
        else:
            by_storage[key] = name
            tensors[name] = t.detach().contiguous()
    save_file(tensors, str(directory / WEIGHTS))
    (directory / PLAN).write_text(json.dumps({**plan, "aliases": aliases}, indent=1))


def read_plan(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / PLAN).read_text())


def read_weights(directory: Path, plan: dict[str, Any], device: torch.device, like: nn.Module) -> dict[str, Tensor]:
    """The saved tensors on ``device``, each in the dtype of ``like``'s tensor of that name (float parts
    follow the serving dtype; 8-bit weights and their float32 scales stay as saved), aliases shared again."""
    tensors = load_file(str(Path(directory) / WEIGHTS), device=str(device))
    want = {name: t.dtype for name, t in like.state_dict().items()}
    for name, t in tensors.items():
        if name in want and t.dtype != want[name]:
            tensors[name] = t.to(want[name])
    for name, target in plan.get("aliases", {}).items():
        tensors[name] = tensors[target]
    return tensors


def llama_plan(model: Llama) -> dict[str, Any]:
    """What :func:`build_llama` needs to recreate ``model``'s modules: quantized names as before fusion."""
    names, method = [], "none"
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear | QuantEmbedding):
            method = module.method
            prefix, _, leaf = name.rpartition(".")
            names += [f"{prefix}.{part}" for part in FUSED[leaf]] if leaf in FUSED else [name]
    return {
        "names": names,
        "method": method,
        "intermediate_sizes": [layer.mlp.down_proj.in_features for layer in model.layers],
        "qkv_bias": _qkv_bias(model),
        "args": dataclasses.asdict(model.args),
    }


def _qkv_bias(model: Llama) -> bool:
    attn = model.layers[0].self_attn
    proj = attn.q_proj if attn.q_proj is not None else attn.qkv_proj
    return proj.bias is not None


def build_llama(
    directory: Path,
    config: PretrainedConfig | ModelArgs,
    dtype: torch.dtype,
    device: torch.device,
    plan: dict[str, Any],
) -> Llama:
    """The compressed Llama from saved tensors: module structure from ``plan``, weights assigned as saved."""
    args = config if isinstance(config, ModelArgs) else ModelArgs.from_hf(config)
    with torch.device("meta"):
        model = Llama(args, plan["qkv_bias"], plan["intermediate_sizes"])
    model.to(dtype)  # float parts in the serving dtype, before quantized modules appear
    install_quant_modules(model, plan["names"], plan["method"])
    fuse_quantized_projections(model)
    tensors = read_weights(directory, plan, device, model)
    model.load_state_dict(tensors, strict=True, assign=True)
    if args.tie_word_embeddings and plan["method"] == "none":
        model.lm_head.weight = model.embed_tokens.weight  # one Parameter, as Llama.from_hf leaves it
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(args))
    return model.eval()


def encoder_plan(model: nn.Module, intermediate_sizes: list[int]) -> dict[str, Any]:
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)]
    return {
        "names": [n for n, _ in quantized],
        "method": quantized[0][1].method if quantized else "none",
        "intermediate_sizes": intermediate_sizes,
    }


def _has_head(config: PretrainedConfig) -> bool:
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


def build_encoder(
    directory: Path, config: PretrainedConfig, dtype: torch.dtype, device: torch.device, plan: dict[str, Any]
) -> nn.Module:
    """The compressed encoder from saved tensors: a headless BERT as models/bert.py's plain-PyTorch module
    (bit-identical outputs, without importing transformers' modeling code at startup), any other as the
    transformers model (with its classification head if it was saved with one)."""
    if BertArgs.supports(config):
        with torch.device("meta"):  # every parameter is assigned from the file
            model: nn.Module = Bert(config).to(dtype)
        load_encoder_weights(directory, model, plan, device)
        return model.eval()
    # Here, not at the top: transformers' auto classes pull its modeling stack, seconds of imports before /ready
    # on some versions (load_tests/results/ready_time/README.md), which a BERT checkpoint, served above, never needs.
    from transformers.initialization import no_init_weights

    auto_cls = transformers.AutoModelForSequenceClassification if _has_head(config) else transformers.AutoModel
    with no_init_weights():  # every parameter is assigned from the file: random initialization would be thrown away
        model = auto_cls.from_config(config)
    model = model.to(dtype).to(device).eval()
    load_encoder_weights(directory, model, plan)
    return model


def load_encoder_weights(
    directory: Path, model: nn.Module, plan: dict[str, Any], device: torch.device | None = None
) -> None:
    """Reshape ``model`` (an encoder of the original shape) to the saved one and assign the saved tensors (on
    ``device``, default the model's: give it for a model on the meta device)."""
    dev = device if device is not None else next(model.parameters()).device
    with safe_open(str(Path(directory) / WEIGHTS), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    for name, module in list(model.named_modules()):  # pruned layers: resize to the saved shapes
        shape = shapes.get(f"{name}.weight", shapes.get(f"{name}.qweight"))
        if isinstance(module, nn.Linear) and shape is not None and shape != tuple(module.weight.shape):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            resized = nn.Linear(
                shape[1], shape[0], bias=module.bias is not None, device="meta", dtype=module.weight.dtype
            )
            setattr(parent, attr, resized)
    install_quant_modules(model, plan["names"], plan["method"])
    model.load_state_dict(read_weights(directory, plan, dev, model), strict=True, assign=True)


# ------------------------------------------------------------------------------------------ directories


def write_checkpoint(
    out: Path,
    task: Task,
    model: nn.Module,
    plan: dict[str, Any],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    report_json: str,
    made_from: dict[str, Any],
    center: tuple[Tensor, str] | None = None,
) -> None:
    """Write a checkpoint directory at ``out`` through a temporary sibling renamed into place, so readers
    (other replicas, an init container waiting for the marker) never see a half-written one. ``center``: the
    classifier's background center and its key, served instead of computed at startup."""
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not is_checkpoint(out):
        raise ValueError(f"{out} exists and is not a compressed checkpoint; choose an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        write_weights(tmp, model, {**plan, "tokenizer_class": type(tokenizer).__name__})
        (tmp / REPORT).write_text(report_json)
        if center is not None:
            save_file({"center": center[0].detach().cpu().contiguous()}, str(tmp / CENTER), {"key": center[1]})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _record_added_tokens(tmp, tokenizer)
        marker = {
            "format_version": FORMAT_VERSION,
            "task": task,
            "made_from": made_from,
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        old = None
        if out.exists():
            old = out.with_name(f".old-{out.name}-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("compressed checkpoint written to %s", out)


def _record_added_tokens(directory: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The added tokens in ``tokenizer_config.json`` too: without them there, loading parses all of
    ``tokenizer.json`` in Python for them (transformers' legacy path; load_tests/results/ready_time/README.md)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if "added_tokens_decoder" not in config:
        added = {str(i): token.__getstate__() for i, token in tokenizer.added_tokens_decoder.items()}
        path.write_text(json.dumps({**config, "added_tokens_decoder": added}, indent=2, ensure_ascii=False) + "\n")


@dataclass
class Checkpoint:
    """A checkpoint read for serving."""

    model: nn.Module  # Llama (generate); models/bert.py's Bert, or a transformers encoder (classify)
    directory: Path
    tokenizer: PreTrainedTokenizerBase
    report_json: str  # models/compress.py CompressionReport, as written
    marker: dict[str, Any]
    center: tuple[Tensor, str] | None = None  # classification: the background center and its key, if written
    loaded_config: PretrainedConfig | None = None  # see ``config``

    @property
    def config(self) -> PretrainedConfig:
        """The model's transformers config, read when first asked (generation is built without it)."""
        if self.loaded_config is None:
            self.loaded_config = AutoConfig.from_pretrained(self.directory, local_files_only=True)
        return self.loaded_config

    @property
    def id2label(self) -> dict[int, str] | None:
        """The classification head's labels; None without one."""
        if not _has_head(self.config):
            return None
        return {int(k): str(v) for k, v in self.config.id2label.items()}


def read_checkpoint(directory: Path, task: Task, dtype: torch.dtype, device: torch.device) -> Checkpoint:
    """The ``task`` checkpoint in ``directory`` on ``device`` (float parts in ``dtype``); one written for the
    other task is refused, naming the flag that serves it."""
    directory = Path(directory)
    marker = _expect(directory, task)
    start = time.perf_counter()
    plan = read_plan(directory)
    config = None
    if task == "generate" and "args" in plan:
        model = build_llama(directory, ModelArgs(**plan["args"]), dtype, device, plan)
    else:  # classification, or a generation checkpoint written before its plan held the dimensions
        if task == "classify":
            config = _encoder_config(directory)
        else:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        build = build_llama if task == "generate" else build_encoder
        model = build(directory, config, dtype, device, plan)
    tokenizer = _read_tokenizer(directory, plan.get("tokenizer_class"))
    center = None
    if (directory / CENTER).is_file():
        with safe_open(str(directory / CENTER), framework="pt") as f:
            center = (f.get_tensor("center"), f.metadata()["key"])
    log.info("read compressed checkpoint %s in %.2f s", directory.name, time.perf_counter() - start)
    return Checkpoint(model, directory, tokenizer, (directory / REPORT).read_text(), marker, center, config)


def _encoder_config(directory: Path) -> PretrainedConfig:
    """The encoder's ``config.json``: as transformers' base config where models/bert.py serves the model (every
    field it reads is in the file), else through ``AutoConfig``. A model's own config class imports transformers'
    auto-model machinery, seconds before /ready on some versions (load_tests/results/ready_time/README.md)."""
    light = PretrainedConfig.from_dict(json.loads((directory / "config.json").read_text()))
    if BertArgs.supports(light) and all(hasattr(light, name) for name in BertArgs.__dataclass_fields__):
        return light
    return AutoConfig.from_pretrained(directory, local_files_only=True)


def _read_tokenizer(directory: Path, class_name: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer as written, through the class ``AutoTokenizer`` chose then: choosing again would read the
    model's config (importing a Llama's modeling stack), and any auto class imports transformers' auto-model
    machinery, seconds before /ready on some versions. A class transformers exports is looked up directly."""
    tokenizer_class = getattr(transformers, class_name, None) if class_name else None
    if isinstance(tokenizer_class, type) and issubclass(tokenizer_class, PreTrainedTokenizerBase):
        return tokenizer_class.from_pretrained(directory, local_files_only=True)
    if class_name:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        tokenizer_class = tokenizer_class_from_name(class_name)
        if tokenizer_class is not None:
            return tokenizer_class.from_pretrained(directory, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _expect(directory: Path, task: Task) -> dict[str, Any]:
    marker = read_marker(directory)
    if marker["task"] != task:
        flag = "--gen-model" if marker["task"] == "generate" else "--cls-model"
        raise ValueError(f"{directory.name} is a {marker['task']} checkpoint: serve it with {flag}")
    return marker
