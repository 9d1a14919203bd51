"""A trained classification head over frozen sentence embeddings, and its self-describing directory format.

``python -m models.train_classifier`` writes such a directory; ``--cls-model DIR`` serves it (the loader
recognises it by ``classifier_head.json``). The head is a linear layer over the encoder's pooled features
(``pooled_features``: the L2-normalized mean-pooled last layer, which is the sentence embedding, beside the same
of an earlier layer), applied with torch: serving needs neither scikit-learn nor the training data.

Files: ``classifier_head.json`` (format, the encoder spec it was trained on, labels, calibration temperature,
out-of-scope thresholds, training report) and ``classifier_head.safetensors`` (``weight`` [labels, dim],
``bias`` [labels], float32).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

HEAD_FILE = "classifier_head.json"
WEIGHTS_FILE = "classifier_head.safetensors"
FORMAT = "lowlat-classifier-head"
VERSION = 1
# The label a message gets when no label reaches its threshold (out of scope); training data may use it too.
NONE_LABEL = "none"
# The earlier layer pooled beside the last: this share of the encoder's depth (layer 4 of MiniLM's 6). With it, a
# head's cross-validated accuracy and the out-of-scope separation of label scores rose on the intent train split
# (load_tests/results/classify_quality/README.md).
EARLY_LAYER_SHARE = 2 / 3


def early_layer(num_layers: int) -> int:
    """Index in ``hidden_states`` (0: the token embeddings) of the earlier layer pooled beside the last."""
    return max(1, round(num_layers * EARLY_LAYER_SHARE))


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Average the token vectors that the attention mask keeps, then L2-normalize (in float32)."""
    m = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    return F.normalize(summed / m.sum(dim=1).clamp(min=1e-9), p=2, dim=1)


def pooled_features(hidden_states: Sequence[Tensor], mask: Tensor) -> Tensor:
    """``[n, 2d]``: the mean-pooled last layer (the sentence embedding) then the early layer, each unit-norm.
    ``hidden_states`` as HF returns them with ``output_hidden_states`` (embeddings first)."""
    early = hidden_states[early_layer(len(hidden_states) - 1)]
    return torch.cat([mean_pool(hidden_states[-1], mask), mean_pool(early, mask)], dim=-1)


def is_head_dir(path: Path) -> bool:
    """True for a directory written by ``models.train_classifier``."""
    return (Path(path) / HEAD_FILE).is_file()


@dataclass
class ClassifierHead:
    """``softmax((features @ weight.T + bias) / temperature)``: calibrated class probabilities.

    ``features``: ``pooled_features`` of the texts; a head of the embedding's width (written before heads read
    the early layer too) reads the first half, the embedding.

    ``threshold``: single-label, a top probability below it answers ``NONE_LABEL`` (None: never).
    ``label_thresholds``: multi-label, the probability from which each label applies.
    ``encoder``: the ``--cls-model`` spec of the encoder the head was trained on (``default`` or a path,
    relative to the head's directory when it was given relative to it).
    """

    labels: list[str]
    weight: Tensor
    bias: Tensor
    encoder: str = "default"
    temperature: float = 1.0
    threshold: float | None = None
    label_thresholds: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    name: str = "head"

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.weight.shape[0] != len(self.labels):
            raise ValueError(f"head weight {tuple(self.weight.shape)} does not match {len(self.labels)} labels")
        if self.bias.shape != (len(self.labels),):
            raise ValueError(f"head bias {tuple(self.bias.shape)} does not match {len(self.labels)} labels")
        if not self.temperature > 0:
            raise ValueError("head temperature must be > 0")

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def to(self, device: torch.device | str) -> ClassifierHead:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def probs(self, features: Tensor) -> Tensor:
        """Calibrated probabilities ``[n, labels]`` for features ``[n, >= dim]`` (their first ``dim`` columns)."""
        logits = features[:, : self.dim].float() @ self.weight.T + self.bias
        return torch.softmax(logits / self.temperature, dim=-1)

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight.float().contiguous().cpu(), "bias": self.bias.float().contiguous().cpu()},
            str(out_dir / WEIGHTS_FILE),
        )
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "encoder": self.encoder,
            "labels": self.labels,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "label_thresholds": self.label_thresholds,
            "none_label": NONE_LABEL,
            "report": self.report,
        }
        (out_dir / HEAD_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, head_dir: Path) -> ClassifierHead:
        head_dir = Path(head_dir)
        meta = json.loads((head_dir / HEAD_FILE).read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{head_dir / HEAD_FILE}: not a {FORMAT} v{VERSION} file")
        tensors = load_file(str(head_dir / WEIGHTS_FILE))
        return cls(
            labels=[str(x) for x in meta["labels"]],
            weight=tensors["weight"].float(),
            bias=tensors["bias"].float(),
            encoder=str(meta.get("encoder", "default")),
            temperature=float(meta.get("temperature", 1.0)),
            threshold=None if meta.get("threshold") is None else float(meta["threshold"]),
            label_thresholds={str(k): float(v) for k, v in (meta.get("label_thresholds") or {}).items()},
            report=dict(meta.get("report") or {}),
            name=head_dir.name,
        )

    def encoder_spec(self, head_dir: Path) -> str:
        """The encoder spec to load: ``default``/``dummy:...`` as is, a relative path from the head's directory."""
        spec = self.encoder
        if spec == "default" or spec.startswith("dummy:") or Path(spec).is_absolute():
            return spec
        return str((Path(head_dir) / spec).resolve())
