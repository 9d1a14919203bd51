"""Offline: fit a classification head on frozen embeddings of the serving encoder.

    python -m models.train_classifier --data FILE.jsonl [--data MORE.jsonl] --out DIR [--encoder default]

Each line of the data is ``{"text": ..., "label": ...}``; rows labelled ``none`` are out-of-scope messages
(a class of their own, and the data that sets the out-of-scope threshold). The encoder pools every text once
(``models.classifier_head.pooled_features``: the mean-pooled, L2-normalized last layer and an earlier one, what
/classify computes; against the last layer alone this raised cross-validated accuracy on the intent train split,
load_tests/results/classify_quality/README.md); a multinomial logistic regression is chosen over its
regularization and class weighting (as given, or balanced so that every label weighs the same in the loss) by
stratified cross-validation; its out-of-fold probabilities then fit a calibration
temperature (least negative log-likelihood), the out-of-scope threshold and, for ``multi_label``, one
threshold per label (best F1 each). The final head is fitted on all rows and written as
models/classifier_head.py describes; ``--cls-model DIR`` serves it. Needs scikit-learn (``pip install -e
.[train]``); serving does not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.classifier_head import NONE_LABEL, ClassifierHead, pooled_features
from models.loader import LoadedEncoder, load_encoder

log = logging.getLogger(__name__)

C_GRID = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0)  # inverse regularization strengths tried by cross-validation
CLASS_WEIGHTS = (None, "balanced")  # rows as given, or every label's rows weighing the same in all (sklearn)
THRESHOLD_GRID = np.round(np.arange(0.05, 0.96, 0.01), 2)
TEMPERATURE_GRID = np.round(np.exp(np.linspace(np.log(0.2), np.log(5.0), 161)), 4)


def read_rows(paths: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(texts, labels) of JSONL files of ``{"text", "label"}`` rows."""
    texts, labels = [], []
    for path in paths:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
                raise ValueError(f"{path}:{n}: each line must be an object with string 'text' and 'label'")
            texts.append(row["text"])
            labels.append(row["label"])
    return texts, labels


@torch.inference_mode()
def embed_texts(encoder: LoadedEncoder, texts: Sequence[str], batch: int = 64, max_length: int = 256) -> Tensor:
    """Pooled features ``[n, 2d]`` (float32, CPU), as engine.classifier computes them (tests check that the
    two agree)."""
    model = getattr(encoder.model, "base_model", encoder.model)
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch):
        enc = encoder.tokenizer(
            list(texts[i : i + batch]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc = {k: v.to(dev) for k, v in enc.items()}
        hidden_states = model(**enc, output_hidden_states=True).hidden_states
        out.append(pooled_features(hidden_states, enc["attention_mask"]).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, gold: np.ndarray) -> float:
    """The temperature of least negative log-likelihood of ``gold`` under ``softmax(logits / T)``."""
    nll = [-np.log(_softmax(logits, t)[np.arange(len(gold)), gold] + 1e-12).mean() for t in TEMPERATURE_GRID]
    return float(TEMPERATURE_GRID[int(np.argmin(nll))])


def expected_calibration_error(probs: np.ndarray, gold: np.ndarray, bins: int = 10) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by their share of rows."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(conf[sel].mean() - (pred[sel] == gold[sel]).mean())
    return float(ece)


def predict(probs: np.ndarray, names: Sequence[str], threshold: float | None) -> list[str]:
    """Single-label answers as the server gives them (engine.classifier.single_result)."""
    top = probs.argmax(axis=1)
    return [
        NONE_LABEL if threshold is not None and p[i] < threshold else names[i] for p, i in zip(probs, top, strict=True)
    ]


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred, average="macro", zero_division=0))


@dataclass
class Fit:
    head: ClassifierHead
    report: dict[str, Any]


def train(
    texts: Sequence[str],
    labels: Sequence[str],
    emb: Tensor,
    encoder_spec: str = "default",
    folds: int = 5,
    seed: int = 0,
) -> Fit:
    """Chooses, calibrates and fits the head on pooled features ``emb`` of ``texts``; see the module docstring."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # BLAS threads on problems this small only contend (10-20x slower on 2 cores)
        return _train(texts, labels, emb, encoder_spec, folds, seed)


def _train(texts: Sequence[str], labels: Sequence[str], emb: Tensor, encoder_spec: str, folds: int, seed: int) -> Fit:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError("training data needs at least two labels")
    y = np.array([names.index(label) for label in labels])
    x = emb.numpy().astype(np.float64)
    folds = min(folds, int(np.bincount(y).min()))
    if folds < 2:
        raise ValueError("every label needs at least two examples for cross-validation")
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))

    def oof_logits(c: float, weight: str | None) -> np.ndarray:
        out = np.zeros((len(y), len(names)))
        for tr, te in splits:
            model = LogisticRegression(C=c, class_weight=weight, max_iter=2000).fit(x[tr], y[tr])
            out[te] = model.decision_function(x[te])
        return out

    grid = list(itertools.product(C_GRID, CLASS_WEIGHTS))
    cv = {(c, w): oof_logits(c, w) for c, w in grid}
    cv_acc = {key: float((logits.argmax(1) == y).mean()) for key, logits in cv.items()}
    # ties: the stronger regularization, then rows as given
    best_c, best_weight = max(grid, key=lambda key: (cv_acc[key], -key[0], key[1] is None))
    logits = cv[(best_c, best_weight)]
    temperature = fit_temperature(logits, y)
    raw, calibrated = _softmax(logits), _softmax(logits, temperature)
    gold = [names[i] for i in y]

    threshold = None
    if NONE_LABEL in names:  # out-of-scope rows: the bar that answers them best, on out-of-fold probabilities
        scores = {float(t): macro_f1(gold, predict(calibrated, names, float(t))) for t in THRESHOLD_GRID}
        best = max(scores.values())
        if best > macro_f1(gold, predict(calibrated, names, None)):
            threshold = min(t for t, s in scores.items() if s == best)
    label_thresholds = {}
    for j, name in enumerate(names):
        if name == NONE_LABEL:
            continue
        is_label = y == j
        f1 = [_binary_f1(is_label, calibrated[:, j] >= t) for t in THRESHOLD_GRID]
        label_thresholds[name] = float(THRESHOLD_GRID[int(np.argmax(f1))])

    final = LogisticRegression(C=best_c, class_weight=best_weight, max_iter=2000).fit(x, y)
    weight, bias = final.coef_, final.intercept_
    if len(names) == 2:  # sklearn keeps one row for two classes: the equivalent two-row softmax
        weight, bias = np.vstack([-weight[0] / 2, weight[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    pred = predict(calibrated, names, threshold)
    report = {
        "rows": len(y),
        "per_label": {name: int((y == j).sum()) for j, name in enumerate(names)},
        "model": (
            f"multinomial logistic regression, C={best_c}, class weights {best_weight or 'as given'} "
            f"(of C in {list(C_GRID)} x weights as given / balanced, by {folds}-fold CV accuracy)"
        ),
        "class_weight": best_weight,
        "cv_accuracy_by_C": {str(c): round(cv_acc[(c, None)], 4) for c in C_GRID},
        "cv_accuracy_by_C_balanced": {str(c): round(cv_acc[(c, "balanced")], 4) for c in C_GRID},
        "cv_accuracy": round(float((np.array(pred) == np.array(gold)).mean()), 4),
        "cv_macro_f1": round(macro_f1(gold, pred), 4),
        "cv_accuracy_without_threshold": round(cv_acc[(best_c, best_weight)], 4),
        "temperature": temperature,
        "cv_ece_raw": round(expected_calibration_error(raw, y), 4),
        "cv_ece_calibrated": round(expected_calibration_error(calibrated, y), 4),
        "threshold": threshold,
        "seconds": round(time.perf_counter() - start, 2),
    }
    head = ClassifierHead(
        labels=names,
        weight=torch.tensor(weight, dtype=torch.float32),
        bias=torch.tensor(bias, dtype=torch.float32),
        encoder=encoder_spec,
        temperature=temperature,
        threshold=threshold,
        label_thresholds=label_thresholds,
        report=report,
    )
    return Fit(head, report)


def _binary_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    tp = float((gold & pred).sum())
    return 0.0 if tp == 0 else 2 * tp / (float(gold.sum()) + float(pred.sum()))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, action="append", required=True, help="JSONL of {text, label}; repeatable")
    ap.add_argument("--out", type=Path, required=True, help="directory to write (served by --cls-model DIR)")
    ap.add_argument("--encoder", default="default", help="--cls-model spec of the encoder (default: embedded MiniLM)")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/lowlat-server").expanduser())
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    texts, labels = read_rows(args.data)
    torch.manual_seed(args.seed)
    encoder = load_encoder(args.encoder, args.cache_dir, torch.float32)
    start = time.perf_counter()
    emb = embed_texts(encoder, texts)
    log.info("embedded %d texts in %.1f s", len(texts), time.perf_counter() - start)
    spec = args.encoder
    if spec != "default" and not spec.startswith("dummy:"):
        spec = str(Path(spec).expanduser().resolve())
    fit = train(texts, labels, emb, spec, args.folds, args.seed)
    fit.head.save(args.out)
    print(json.dumps(fit.report, indent=2))


if __name__ == "__main__":
    main()
