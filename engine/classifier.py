"""Encoder execution: sentence embeddings; classification by similarity to labels (zero-shot from a label's
name or description, few-shot from its examples), with the model's own head, or with a trained head over
the embeddings (models/classifier_head.py); an optional out-of-scope threshold answers ``"none"``.

Label-set scores are cosines after subtracting the mean embedding of a fixed generic background text
(``BACKGROUND``) from inputs and label texts alike: what every sentence shares (the encoder's common direction)
no longer counts as similarity, while the scale of the cosines stays about the same. Labels are ranked by the
sentence embedding's cosines with a small share of the earlier layer's (``RANK_EARLY_WEIGHT``); whether the best
one applies at all (the out-of-scope threshold) is judged by its cosine averaged over the last and an earlier
layer's pooled states (``label_scores``), which separated out-of-scope messages better on the train split.

All methods are synchronous and meant to run on the batcher's single worker thread; only the
tokenizer (also used from the event loop by ``token_ids``) and the label cache are locked.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.encoder_graphs import EncoderGraphs
from engine.response_cache import BytesLRU
from models.classifier_head import NONE_LABEL, ClassifierHead, pooled_features

# Zero-shot logit scale. all-MiniLM-L6-v2 (like most sentence-transformers models) was trained
# with MultipleNegativesRankingLoss, i.e. a softmax over cosine similarities multiplied by
# scale=20 (temperature 0.05). Using the same temperature makes softmax(20 * cos) the
# distribution the model was trained to produce over candidates, instead of an arbitrary sharpness.
DEFAULT_TEMPERATURE = 0.05
# Multi-label: each label is scored independently as sigmoid((cos - threshold) / temperature).
# The scale is the training scale above; the threshold is where a label becomes "more likely than
# not": for MiniLM on customer-service messages it lies above nearly all unrelated text/label pairs'
# cosines and near the matching pairs' median (load_tests/results/label_threshold/results.md). It was
# chosen before label scores were centered on a background (b38bcca); centering on that background keeps
# cosines on about the same scale, so the bar was kept (load_tests/results/classify_quality/README.md).
DEFAULT_MULTI_LABEL_THRESHOLD = 0.35
# Label features kept for reuse, bounded by bytes (labels are client text): ~3,600 of the longest labels
# accepted or ~4,600 short ones with MiniLM's 2 x 384 floats; a tensor's own bookkeeping is a flat overhead.
# Label sets' prototypes are kept under the same bound again.
LABEL_CACHE_BYTES = 16 * 2**20
TENSOR_OVERHEAD_BYTES = 512
# How a label's examples (and its description, counted as one more example) score an input, chosen on the
# train split (load_tests/results/classify_quality/README.md): "prototype" (cosine to the mean of the
# example embeddings), "knn" (the best example's cosine) or "mix" (the average of the two).
FEW_SHOT_METHODS = ("prototype", "knn", "mix")
DEFAULT_FEW_SHOT = "prototype"
# In a label's prototype its description counts as this many examples (``LabelSpec.weights``), and labels are
# ranked by ``(last + RANK_EARLY_WEIGHT * early) / (1 + RANK_EARLY_WEIGHT)`` of the two layers' cosines (the scale
# of a cosine kept, so the multi-label bar still reads as one). Both chosen together on the train split, by the
# mean accuracy of the five label-set modes over resampled draws of examples
# (load_tests/results/classify_quality/README.md): a description says more about a label than one example does,
# and the earlier layer adds a little to which intent a message names.
DESCRIPTION_WEIGHT = 3.0
RANK_EARLY_WEIGHT = 0.1
# The background whose mean embedding is subtracted before label-set cosines (module docstring): the prose
# paragraphs of data/calibration.txt (cooking, travel, science, finance, code, a few service texts). Against no
# centering, the empty string's embedding and all of calibration.txt, it scored best on the train split
# (load_tests/results/classify_quality/README.md). Embedded once per classifier, on first use.
BACKGROUND: tuple[str, ...] = tuple(
    line for line in files("engine").joinpath("background.txt").read_text(encoding="utf-8").splitlines() if line
)
# What a stored center (a compressed checkpoint's, written by python -m models.compress) is valid for besides the
# weights: the background's texts and this tag of how ``Classifier.center`` pools them. Change the tag with the
# pooling, so that checkpoints written before are recomputed at startup instead of served a stale center.
CENTER_FORMAT = "mean of the pooled features of the background texts, batches of 16 by length"


def center_key(background: Sequence[str] = BACKGROUND) -> str:
    """What ``Classifier.center`` depends on besides the weights: the background and ``CENTER_FORMAT``. A
    center stored with the weights is valid under the same key."""
    return hashlib.sha256(("\n".join(background) + "\0" + CENTER_FORMAT).encode()).hexdigest()


class EncoderLike(Protocol):
    """What the classifier needs from ``models.loader.LoadedEncoder``."""

    model: torch.nn.Module
    tokenizer: Any
    id2label: dict[int, str] | None
    head: ClassifierHead | None


class ClassifierInputError(ValueError):
    """A request the classifier cannot serve; ``field`` names the offending request field."""

    field: str = "input"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class NoClassificationHead(ClassifierInputError):
    """No ``labels`` given and the model has no classification head to fall back on (HTTP 400)."""

    field = "labels"


@dataclass(frozen=True)
class LabelSpec:
    """A candidate label: scored by its examples (few-shot) plus its description, or by its description
    alone, or by its name alone (zero-shot). ``threshold`` (cosine similarity) is its own bar in
    ``multi_label`` mode."""

    name: str
    description: str | None = None
    examples: tuple[str, ...] = ()
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.examples, tuple):
            object.__setattr__(self, "examples", tuple(self.examples))

    @property
    def texts(self) -> tuple[str, ...]:
        """What is embedded for this label: its examples and description, else its name."""
        texts = (*self.examples, self.description) if self.description else self.examples
        return texts or (self.name,)

    def weights(self, description_weight: float = DESCRIPTION_WEIGHT) -> tuple[float, ...]:
        """Each of ``texts``' weight in the label's prototype: 1 per example, ``description_weight`` for the
        description beside examples (alone, it is the prototype whatever its weight)."""
        if self.examples and self.description:
            return (1.0,) * len(self.examples) + (description_weight,)
        return (1.0,) * len(self.texts)


def as_label(label: str | LabelSpec) -> LabelSpec:
    return label if isinstance(label, LabelSpec) else LabelSpec(label)


@dataclass(frozen=True)
class ClassifyItem:
    """One input text of a /classify (or /v1/embeddings) request; the batcher's unit of work.

    ``n_tokens`` (the length of ``EncoderFrontend.token_ids``) is the batcher's cost; it does not affect results.
    On one item per request it also counts the tokens of the request's labels that the label cache
    lacks (``Classifier.uncached_labels``): ``run`` encodes those in that item's batch, so the batch
    token budget covers them as it covers inputs.
    ``embed`` asks for the sentence embedding instead of label scores, so embedding requests share
    the classification batches (one queue, one forward) rather than competing with them.
    ``threshold``: out of scope below it (a cosine for labels, a probability for a head); None: the
    head's own, or none for labels.
    ``ids``: the text's token ids as ``EncoderFrontend.token_ids`` gives them, where the API server has them
    (it tokenizes every input to check its limits): the batch is built from them instead of tokenizing again.
    """

    text: str
    labels: tuple[LabelSpec, ...] | None = None
    multi_label: bool = False
    n_tokens: int = 0
    embed: bool = False
    threshold: float | None = None
    ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(as_label(lab) for lab in self.labels))


@dataclass(frozen=True)
class Embedding:
    """L2-normalized sentence embedding (float32 values)."""

    vector: list[float]


@dataclass
class ClassResult:
    """Top label and all ``(label, score)`` pairs sorted by descending score; ``NONE_LABEL`` when out of
    scope. ``labels``: in ``multi_label`` mode, every label that reaches its threshold (best first)."""

    label: str
    score: float
    scores: list[tuple[str, float]]
    labels: list[str] | None = None


@dataclass(eq=False)
class EncoderFrontend:
    """What validating and sizing classification inputs takes, without the model: an API-server process
    holds one of these while the model itself runs in an engine core."""

    tokenizer: Any
    has_head: bool
    head_labels: list[str]
    max_length: int
    embedding_dim: int
    _tok_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def frontend(self) -> EncoderFrontend:
        """A model-free copy, picklable, for another process."""
        return EncoderFrontend(self.tokenizer, self.has_head, self.head_labels, self.max_length, self.embedding_dim)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_tok_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tok_lock = threading.Lock()

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts including special tokens, untruncated, so limits are enforced upstream."""
        return [len(ids) for ids in self.token_ids(texts)]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids including special tokens, untruncated. A fast tokenizer's Rust backend is called
        directly: the Python wrapper costs more than the tokenizing."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        with self._tok_lock:
            if backend is None:
                return self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
            # The wrapper sets truncation and padding on the backend per call (and _tokenize does):
            # these ids need neither.
            backend.no_truncation()
            backend.no_padding()
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]

    def uncached_labels(self, labels: Sequence[str]) -> list[str]:
        """The distinct label texts (names, descriptions, examples) a batch would have to encode: all of
        them here, where the engine's label cache is out of sight (an upper bound); ``Classifier``
        answers from its cache."""
        return list(dict.fromkeys(labels))

    def check(self, item: ClassifyItem) -> None:
        """Raise ``ClassifierInputError`` if the item cannot be served (call before queueing)."""
        if item.embed:
            return
        if item.labels is None:
            if not self.has_head:
                raise NoClassificationHead(
                    "this model has no classification head: provide candidate `labels` for zero-shot classification"
                )
        elif not item.labels:
            raise ClassifierInputError("`labels` must not be empty", field="labels")
        elif len({lab.name for lab in item.labels}) != len(item.labels):
            raise ClassifierInputError("label names must be unique", field="labels")


class Classifier(EncoderFrontend):
    """Runs an encoder model: embeddings, zero-shot by label similarity, or the model's head."""

    def __init__(
        self,
        encoder: EncoderLike,
        device: torch.device | str = "cpu",
        *,
        max_length: int | None = None,
        max_batch: int = 64,
        temperature: float = DEFAULT_TEMPERATURE,
        multi_label_threshold: float = DEFAULT_MULTI_LABEL_THRESHOLD,
        label_cache_bytes: int = LABEL_CACHE_BYTES,
        few_shot: str = DEFAULT_FEW_SHOT,
        background: Sequence[str] = BACKGROUND,
    ) -> None:
        if few_shot not in FEW_SHOT_METHODS:
            raise ValueError(f"few_shot must be one of {FEW_SHOT_METHODS}")
        self.device = torch.device(device)
        self.model = encoder.model.to(self.device).eval()
        # The bare encoder (BertModel inside BertForSequenceClassification); itself if headless.
        self.encoder: torch.nn.Module = getattr(self.model, "base_model", self.model)
        self.model_has_head = encoder.id2label is not None and self.encoder is not self.model
        # A trained head over the embeddings (--cls-model HEAD_DIR) applies when the model has none of its own.
        head = getattr(encoder, "head", None)
        self.head: ClassifierHead | None = None if self.model_has_head or head is None else head.to(self.device)
        config = getattr(self.model, "config", None)
        num_labels = int(getattr(config, "num_labels", 0) or 0)
        if self.head is not None:
            head_labels = list(self.head.labels)
        elif self.model_has_head:
            head_labels = _labels_from_id2label(encoder.id2label, num_labels)
        else:
            head_labels = []
        super().__init__(
            encoder.tokenizer,
            self.model_has_head or self.head is not None,
            head_labels,
            max_length or _model_max_length(encoder.tokenizer, config),
            int(getattr(config, "hidden_size", 0)),
        )
        self.temperature = temperature
        self.multi_label_threshold = multi_label_threshold
        self.few_shot = few_shot
        self.background = tuple(background)
        self._center: Tensor | None = None
        self._ids_padded_right: bool | None = None  # _padded gives what _tokenize gives (checked on first use)
        self._label_cache: BytesLRU[str, Tensor] = BytesLRU(label_cache_bytes, size=_label_bytes)
        # Per label set, its centered prototypes (``label_prototypes``): a repeated set costs per input what
        # zero-shot does, however many examples its labels have. Worker thread only.
        self._prototypes: BytesLRU[tuple[LabelSpec, ...], Tensor] = BytesLRU(label_cache_bytes, size=_set_bytes)
        self._cache_lock = threading.Lock()
        self.graphs = EncoderGraphs(self._encode, self.device, self.max_length, max_batch)

    # ------------------------------------------------------------------ tokens & embeddings

    def _tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """CPU tensors ``[n, longest]``; EncoderGraphs pads them to a bucket and moves them."""
        with self._tok_lock:
            enc = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        return dict(enc)

    def capture_graphs(self, max_tokens: int) -> None:
        """On CUDA, capture the encoder for every batch bucket of at most ``max_tokens`` padded tokens; on any
        device embed the background (``center``), so that no request pays for either."""
        self.graphs.capture_all(self._tokenize(["warm up"]), max_tokens)
        self.center()

    def _forward(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """One forward over ``texts`` (a CUDA graph replay where one fits)."""
        return self.graphs(self._tokenize(texts))

    def _forward_items(self, items: Sequence[ClassifyItem]) -> tuple[Tensor, Tensor | None]:
        """One forward over the items' texts, from the token ids they carry when every one does and fits, and
        padding ids gives this tokenizer's own batches."""
        rows = [it.ids for it in items]
        if any(r is None or len(r) > self.max_length for r in rows) or not self._ids_pad_as_tokenized():
            return self._forward([it.text for it in items])
        return self.graphs(self._padded(rows))  # type: ignore[arg-type]

    def _ids_pad_as_tokenized(self) -> bool:
        """Whether ``_padded`` rebuilds this tokenizer's batches: not for left padding, or a template that gives
        special tokens a segment type of their own (checked once, on texts of different lengths)."""
        if self._ids_padded_right is None:
            probe = ["a", "two words here", "[CLS] a longer text, with punctuation: 12% off!"]
            ours, theirs = self._padded(self.token_ids(probe)), self._tokenize(probe)
            self._ids_padded_right = list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
        return self._ids_padded_right

    def _padded(self, rows: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """What ``_tokenize`` returns for the texts these ids came from (right padding to the longest)."""
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        filled = np.arange(lengths.max()) < lengths[:, None]  # row-major: the ids in order, row after row
        flat = np.full(filled.shape, self.tokenizer.pad_token_id, dtype=np.int64)
        flat[filled] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        ids, mask = torch.from_numpy(flat), torch.from_numpy(filled.astype(np.int64))
        out = {"input_ids": ids, "token_type_ids": None, "attention_mask": mask}
        if "token_type_ids" in self.tokenizer.model_input_names:  # one segment: 0, padding its own type
            out["token_type_ids"] = torch.where(mask.bool(), 0, self.tokenizer.pad_token_type_id)
        return {name: out[name] for name in self.tokenizer.model_input_names if out.get(name) is not None}

    def _encode(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(pooled features ``[n, 2d]``, head logits or None) for device ``inputs``: the L2-normalized
        mean-pooled last layer (the sentence embedding) and the same of an earlier layer
        (``models.classifier_head.pooled_features``); the hidden states are kept from the one forward.
        With a model head, the full model runs once, so features and logits come from the same forward.
        """
        mask = inputs["attention_mask"]
        if not self.model_has_head:
            out = self.encoder(**inputs, output_hidden_states=True)
            return pooled_features(out.hidden_states, mask), None
        out = self.model(**inputs, output_hidden_states=True)
        return pooled_features(out.hidden_states, mask), out.logits.float()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> Tensor:
        """Sentence embeddings ``[n, d]``: attention-masked mean pooling, then L2 normalization
        (what sentence-transformers does for all-MiniLM-L6-v2); float32 on the model device."""
        return self.features(texts)[:, : self.embedding_dim]

    @torch.inference_mode()
    def features(self, texts: list[str]) -> Tensor:
        """Pooled features ``[n, 2d]`` (``_encode``): the sentence embedding, then the early layer's."""
        if not texts:
            return torch.zeros(0, 2 * self.embedding_dim, device=self.device)
        return self._forward(texts)[0]

    def uncached_labels(self, labels: Sequence[str]) -> list[str]:
        """The distinct ``labels`` not in the label cache now: a batch using them encodes them."""
        with self._cache_lock:
            return [lab for lab in dict.fromkeys(labels) if lab not in self._label_cache]

    def _label_embeddings(self, labels: Sequence[str]) -> dict[str, Tensor]:
        """Features of the label texts ``labels``; only uncached ones are encoded (in one forward)."""
        with self._cache_lock:
            found = {lab: vec for lab in labels if (vec := self._label_cache.get(lab)) is not None}
        missing = [lab for lab in dict.fromkeys(labels) if lab not in found]
        if missing:
            fresh = self.features(missing)
            with self._cache_lock:
                for lab, vec in zip(missing, fresh, strict=True):
                    found[lab] = vec.clone()
                    self._label_cache.put(lab, found[lab])
        return found

    @torch.inference_mode()
    def center(self) -> Tensor | None:
        """The background's mean features (``[2d]``, not normalized), computed on first use; None without one."""
        if self._center is None and self.background:
            texts = sorted(self.background, key=len)  # batches of like lengths: less padding
            self._center = torch.cat([self.features(texts[i : i + 16]) for i in range(0, len(texts), 16)]).mean(0)
        return self._center

    @torch.inference_mode()
    def use_center(self, center: Tensor, key: str) -> bool:
        """Serve ``center``, computed by :meth:`center` when the model's checkpoint was written, instead of
        embedding the background at startup; refused (False: computed on first use as without one) when its
        key or width is not this classifier's."""
        if key != center_key(self.background) or center.shape != self._forward(["x"])[0].shape[1:]:
            return False
        self._center = center.to(self.device)
        return True

    # ------------------------------------------------------------------ classification

    @torch.inference_mode()
    def run(self, batch: Sequence[ClassifyItem]) -> list[ClassResult | Embedding | ClassifierInputError]:
        """Classify a batch with ONE forward over all texts, then score per (labels, multi_label) group;
        ``embed`` items get their embedding row from the same forward.

        Invalid items get their ``ClassifierInputError`` in place of a result (the batcher fails
        only that item). Results equal running each item alone up to float rounding: padding is
        masked out of attention and pooling.
        """
        results: list[ClassResult | Embedding | ClassifierInputError | None] = [None] * len(batch)
        valid: list[int] = []
        for i, item in enumerate(batch):
            try:
                self.check(item)
                valid.append(i)
            except ClassifierInputError as exc:
                results[i] = exc
        if not valid:
            return results  # type: ignore[return-value]
        emb, logits = self._forward_items([batch[i] for i in valid])
        row = {i: r for r, i in enumerate(valid)}

        groups: dict[tuple[tuple[LabelSpec, ...] | None, bool, float | None], list[int]] = {}
        for i in valid:
            if batch[i].embed:
                results[i] = Embedding(emb[row[i], : self.embedding_dim].cpu().tolist())
                continue
            groups.setdefault((batch[i].labels, batch[i].multi_label, batch[i].threshold), []).append(i)
        center = self.center()
        protos: dict[tuple[LabelSpec, ...], Tensor] = {}
        if self.few_shot == "prototype":  # label sets whose prototypes are cached need none of their texts
            protos = {lab: p for (lab, _, _) in groups if lab and (p := self._prototypes.get(lab)) is not None}
        texts = [t for (labels, _, _) in groups if labels and labels not in protos for lab in labels for t in lab.texts]
        vectors = self._label_embeddings(list(dict.fromkeys(texts))) if texts else {}  # one forward for new ones

        for (labels, multi_label, threshold), members in groups.items():
            rows = _rows([row[i] for i in members], emb.device)
            if labels is None:
                out = self._head_results(emb[rows], None if logits is None else logits[rows], multi_label, threshold)
            else:
                if self.few_shot == "prototype":
                    if labels not in protos:
                        sets = [torch.stack([vectors[t] for t in lab.texts]) for lab in labels]
                        protos[labels] = label_prototypes(sets, center, [lab.weights() for lab in labels])
                        self._prototypes.put(labels, protos[labels])
                    sims, gate = prototype_scores(emb[rows], protos[labels], center)
                else:
                    sets = [torch.stack([vectors[t] for t in lab.texts]) for lab in labels]
                    sims, gate = label_scores(emb[rows], sets, self.few_shot, center, [lab.weights() for lab in labels])
                out = similarity_results(
                    sims, labels, multi_label, threshold, self.temperature, self.multi_label_threshold, gate
                )
            for i, result in zip(members, out, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def _head_results(
        self, emb: Tensor, logits: Tensor | None, multi_label: bool, threshold: float | None
    ) -> list[ClassResult]:
        """The model's own head (sigmoid / softmax of its logits) or the trained head's calibrated
        probabilities, with its data-chosen thresholds unless the request gives one."""
        names = self.head_labels
        if self.head is not None:
            probs = self.head.probs(emb).cpu().tolist()
            if multi_label:
                bars = [threshold if threshold is not None else self.head.label_thresholds.get(n, 0.5) for n in names]
                return [multi_result(names, p, bars) for p in probs]
            bar = threshold if threshold is not None else self.head.threshold
            return [single_result(names, p, bar) for p in probs]
        assert logits is not None
        if multi_label:
            bars = [0.5 if threshold is None else threshold] * len(names)
            return [multi_result(names, p, bars) for p in torch.sigmoid(logits).cpu().tolist()]
        return [single_result(names, p, threshold) for p in torch.softmax(logits, dim=-1).cpu().tolist()]

    def classify(
        self,
        texts: list[str],
        labels: Sequence[str | LabelSpec] | None = None,
        multi_label: bool = False,
        threshold: float | None = None,
    ) -> list[ClassResult]:
        """Convenience wrapper over ``run`` for one request; raises instead of returning errors."""
        label_tuple = tuple(as_label(lab) for lab in labels) if labels is not None else None
        items = [ClassifyItem(t, label_tuple, multi_label, threshold=threshold) for t in texts]
        if items:
            self.check(items[0])  # all items share labels: fail fast with the specific error
        out = self.run(items)
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out  # type: ignore[return-value]


def _rows(rows: list[int], device: torch.device) -> slice | Tensor:
    """Indexes ``rows`` of the batch's features: a slice where they are consecutive (one label set in a batch,
    a lone request: no index tensor copied to the device), else an index tensor."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)


def _label_bytes(label: str, vector: Tensor) -> int:
    return sys.getsizeof(label) + vector.nbytes + TENSOR_OVERHEAD_BYTES


def _set_bytes(labels: tuple[LabelSpec, ...], prototypes: Tensor) -> int:
    texts = sum(sys.getsizeof(t) for lab in labels for t in (lab.name, *lab.texts))
    return texts + prototypes.nbytes + TENSOR_OVERHEAD_BYTES


Weights = Sequence[Sequence[float]]


def _mean(vecs: Tensor, weights: Sequence[float] | None) -> Tensor:
    """The (weighted) mean of the rows of ``vecs``."""
    if weights is None:
        return vecs.mean(dim=0)
    w = torch.tensor(weights, dtype=vecs.dtype, device=vecs.device)
    return (w[:, None] * vecs).sum(dim=0) / w.sum()


def label_similarities(
    emb: Tensor,
    label_vectors: Sequence[Tensor],
    method: str = DEFAULT_FEW_SHOT,
    center: Tensor | None = None,
    weights: Weights | None = None,
) -> Tensor:
    """Cosine similarities ``[n, L]`` of embeddings ``[n, d]`` to labels given as sets of unit vectors
    ``[k_l, d]`` (one vector: zero-shot; several: few-shot, scored by ``method``, see FEW_SHOT_METHODS).
    With ``center`` (the background's mean embedding) every vector is re-normalized after subtracting it.
    ``weights`` (per label, per vector: ``LabelSpec.weights``) weigh the prototype's mean; None: equal."""
    if center is not None:
        emb = F.normalize(emb - center, dim=-1)
        label_vectors = [F.normalize(vecs - center, dim=-1) for vecs in label_vectors]
    cols = []
    for j, vecs in enumerate(label_vectors):
        if vecs.shape[0] == 1:
            cols.append(emb @ vecs[0])
            continue
        proto = emb @ F.normalize(_mean(vecs, None if weights is None else weights[j]), dim=0)
        knn = (emb @ vecs.T).max(dim=-1).values
        cols.append({"prototype": proto, "knn": knn, "mix": (proto + knn) / 2}[method])
    return torch.stack(cols, dim=-1)


def _rank_and_gate(last: Tensor, early: Tensor, early_weight: float) -> tuple[Tensor, Tensor]:
    """(ranking, gate) from the two layers' cosines: see ``label_scores``."""
    return (last + early_weight * early) / (1 + early_weight), (last + early) / 2


def label_scores(
    features: Tensor,
    label_features: Sequence[Tensor],
    method: str = DEFAULT_FEW_SHOT,
    center: Tensor | None = None,
    weights: Weights | None = None,
    early_weight: float = RANK_EARLY_WEIGHT,
) -> tuple[Tensor, Tensor]:
    """(ranking, gate) ``[n, L]`` from pooled features ``[n, 2d]`` and labels' ``[k_l, 2d]`` (``center``: ``[2d]``;
    ``weights``: as for ``label_similarities``).

    Per half (the sentence embedding, the early layer's pooled states), ``label_similarities``. Ranking: the
    sentence embedding's cosine with ``early_weight`` of the early layer's, on a cosine's scale. Gate: the mean of
    both, what the out-of-scope threshold is compared with: chosen on the train split over the sentence
    embedding's alone, where it separated out-of-scope messages better
    (load_tests/results/classify_quality/README.md)."""
    d = features.shape[-1] // 2
    halves = []
    for part in (slice(0, d), slice(d, 2 * d)):
        sets = [vecs[:, part] for vecs in label_features]
        c = None if center is None else center[part]
        halves.append(label_similarities(features[:, part], sets, method, c, weights))
    return _rank_and_gate(halves[0], halves[1], early_weight)


def label_prototypes(
    label_features: Sequence[Tensor], center: Tensor | None = None, weights: Weights | None = None
) -> Tensor:
    """``[L, 2d]``: per label (``[k_l, 2d]`` features) and per half, the normalized (``weights``-weighted) mean of
    its centered, re-normalized vectors: what ``label_scores`` with ``"prototype"`` compares inputs with."""
    d = label_features[0].shape[-1] // 2
    halves = []
    for part in (slice(0, d), slice(d, 2 * d)):
        c = None if center is None else center[part]
        vecs = [v[:, part] if c is None else F.normalize(v[:, part] - c, dim=-1) for v in label_features]
        means = [_mean(v, None if weights is None else weights[j]) for j, v in enumerate(vecs)]
        halves.append(F.normalize(torch.stack(means), dim=-1))
    return torch.cat(halves, dim=-1)


def prototype_scores(
    features: Tensor, prototypes: Tensor, center: Tensor | None = None, early_weight: float = RANK_EARLY_WEIGHT
) -> tuple[Tensor, Tensor]:
    """``label_scores(features, sets, "prototype", center, weights, early_weight)`` from the sets'
    ``label_prototypes(sets, center, weights)``: (ranking, gate)."""
    d = features.shape[-1] // 2
    halves = []
    for part in (slice(0, d), slice(d, 2 * d)):
        f = features[:, part] if center is None else F.normalize(features[:, part] - center[part], dim=-1)
        halves.append(f @ prototypes[:, part].T)
    return _rank_and_gate(halves[0], halves[1], early_weight)


def similarity_results(
    sims: Tensor,
    labels: Sequence[LabelSpec],
    multi_label: bool,
    threshold: float | None,
    temperature: float = DEFAULT_TEMPERATURE,
    multi_label_threshold: float = DEFAULT_MULTI_LABEL_THRESHOLD,
    gate: Tensor | None = None,
) -> list[ClassResult]:
    """Label scores from cosine similarities ``[n, L]``.

    Single-label: ``softmax(sims / temperature)``; with a ``threshold`` an extra ``NONE_LABEL`` competes
    with the logit ``(best + threshold - gate) / temperature``, where ``best`` is the top similarity and
    ``gate`` that label's entry in ``gate`` (``label_scores``; without one, ``best`` itself: the logit is
    ``threshold / temperature``), so it wins exactly when the best label's gate score is under the threshold.
    Multi-label: each label independently ``sigmoid((sim - bar) / temperature)`` with its own bar (the
    label's threshold, else the request's, else ``multi_label_threshold``): it applies from 0.5 on.
    """
    names = [lab.name for lab in labels]
    if multi_label:
        default = threshold if threshold is not None else multi_label_threshold
        bars = torch.tensor([default if lab.threshold is None else lab.threshold for lab in labels], device=sims.device)
        probs = torch.sigmoid((sims - bars) / temperature).cpu().tolist()
        return [multi_result(names, p, [0.5] * len(names)) for p in probs]
    if threshold is None:
        return [single_result(names, p, None) for p in torch.softmax(sims / temperature, dim=-1).cpu().tolist()]
    if gate is None:
        none = torch.full((sims.shape[0], 1), threshold, device=sims.device, dtype=sims.dtype)
    else:
        best, top = sims.max(dim=-1, keepdim=True)
        none = best + threshold - gate.gather(-1, top)
    probs = torch.softmax(torch.cat([sims, none], dim=-1) / temperature, dim=-1).cpu().tolist()
    return [single_result([*names, NONE_LABEL], p, None) for p in probs]


def single_result(names: Sequence[str], probs: Sequence[float], threshold: float | None) -> ClassResult:
    """The best label, or ``NONE_LABEL`` (score: 1 - the best label's) when its probability is under ``threshold``."""
    scores = sorted(zip(names, probs, strict=True), key=lambda kv: kv[1], reverse=True)
    label, score = scores[0]
    if threshold is not None and score < threshold and label != NONE_LABEL:
        return ClassResult(label=NONE_LABEL, score=1.0 - score, scores=scores)
    return ClassResult(label=label, score=score, scores=scores)


def multi_result(names: Sequence[str], probs: Sequence[float], bars: Sequence[float]) -> ClassResult:
    """Every label whose score reaches its bar applies (``labels``); the answer is the best of those, or
    ``NONE_LABEL`` (score: 1 - the best label's) when none does."""
    ranked = sorted(zip(names, probs, bars, strict=True), key=lambda kv: kv[1], reverse=True)
    applies = [name for name, p, bar in ranked if p >= bar]
    scores = [(name, p) for name, p, _ in ranked]
    if applies:
        return ClassResult(label=applies[0], score=dict(scores)[applies[0]], scores=scores, labels=applies)
    return ClassResult(label=NONE_LABEL, score=1.0 - scores[0][1], scores=scores, labels=[])


def _labels_from_id2label(id2label: dict[Any, str] | None, num_labels: int = 0) -> list[str]:
    """Head label names ordered by class index (config keys may be ints or numeric strings)."""
    by_index = {int(k): str(v) for k, v in (id2label or {}).items()}
    n = max(num_labels, max(by_index, default=-1) + 1)
    return [by_index.get(i, f"LABEL_{i}") for i in range(n)]


def _model_max_length(tokenizer: Any, config: Any) -> int:
    """Truncation length: the tokenizer's limit capped by the model's position embeddings."""
    candidates = (
        getattr(tokenizer, "model_max_length", None),
        getattr(config, "max_position_embeddings", None),
    )
    limits = [
        n
        for n in candidates
        if isinstance(n, int) and 0 < n < 1_000_000  # HF uses a huge sentinel for "no limit"
    ]
    return min(limits) if limits else 512
