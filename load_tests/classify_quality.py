"""Classification quality and speed per mode, float against the default compression (issue 13's table).

    python -m load_tests.classify_quality [--out load_tests/results/classify_quality]

Modes: zero-shot with bare label names and with the descriptions of data/intent_labels.json; few-shot with
k = 1, 5, 10 examples per intent (drawn from the train split, seed 0) plus the description; the trained head
(models/train_classifier.py on the train split). Everything that is chosen is chosen on the train split
(data/intents.jsonl + data/intents_oos.jsonl): the few-shot scoring method (examples left out of what they
score), each mode's out-of-scope threshold (best macro-F1), the head. Every figure of the table is on the test
split (data/intents_test.jsonl), through ``Classifier.run`` as /classify runs it, for the encoder built by the
server's builder once with ``--cls-quantize none`` and once with the default. Throughput: test inputs per
second in batches of 32, label embeddings already cached (best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

from engine.classifier import FEW_SHOT_METHODS, Classifier, ClassifyItem, ClassResult, LabelSpec, label_similarities
from models.classifier_head import NONE_LABEL
from models.train_classifier import train
from server.config import Settings
from server.runtime import Engines

DATA = Path(__file__).resolve().parent.parent / "data"
KS = (1, 5, 10)
THRESHOLDS = np.round(np.arange(0.0, 0.91, 0.01), 2)


def read(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def draw_examples(texts: Sequence[str], gold: Sequence[str], k: int, seed: int = 0) -> dict[str, list[int]]:
    """``k`` train rows per intent (indices), the same draw for every k's prefix."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(gold):
        if label != NONE_LABEL:
            by_label.setdefault(label, []).append(i)
    return {label: rng.sample(idx, len(idx))[:k] for label, idx in sorted(by_label.items())}


def modes(descriptions: dict[str, str], train_texts: Sequence[str], draws: dict[int, dict[str, list[int]]]):
    """mode name -> label specs (None: the trained head)."""
    out: dict[str, tuple[LabelSpec, ...] | None] = {
        "zero-shot, bare labels": tuple(LabelSpec(name.replace("_", " ")) for name in descriptions),
        "zero-shot, descriptions": tuple(LabelSpec(name, desc) for name, desc in descriptions.items()),
    }
    for k, draw in draws.items():
        out[f"few-shot, k={k}"] = tuple(
            LabelSpec(name, desc, tuple(train_texts[i] for i in draw[name])) for name, desc in descriptions.items()
        )
    out["trained head"] = None
    return out


def answer_names(labels: tuple[LabelSpec, ...] | None, name: str) -> str:
    """Bare labels answer with their display text; map it back to the intent name."""
    if labels is None:
        return name
    return {lab.name: lab.name.replace(" ", "_") for lab in labels}.get(name, name)


def sims_of(clf: Classifier, texts: Sequence[str], labels: tuple[LabelSpec, ...], method: str) -> torch.Tensor:
    """Similarities as Classifier.run computes them, every text embedded once per classifier (memoized)."""
    memo = _memo.setdefault(id(clf), {})
    new = sorted({*texts, *(t for lab in labels for t in lab.texts)} - memo.keys())
    if new:
        memo.update(zip(new, clf.embed(new), strict=True))
    emb = torch.stack([memo[t] for t in texts])
    return label_similarities(emb, [torch.stack([memo[t] for t in lab.texts]) for lab in labels], method)


_memo: dict[int, dict[str, torch.Tensor]] = {}


def predict(sims: torch.Tensor, labels: tuple[LabelSpec, ...], threshold: float | None) -> list[str]:
    best, idx = sims.max(dim=-1)
    names = [answer_names(labels, lab.name) for lab in labels]
    return [
        NONE_LABEL if threshold is not None and b < threshold else names[i]
        for b, i in zip(best.tolist(), idx.tolist(), strict=True)
    ]


def scores(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    g, p = np.array(gold), np.array(pred)
    return {
        "accuracy": round(float((g == p).mean()), 4),
        "in_scope_accuracy": round(float((g == p)[g != NONE_LABEL].mean()), 4),
        "macro_f1": round(float(f1_score(g, p, average="macro", zero_division=0)), 4),
        "oos_f1": round(float(f1_score(g == NONE_LABEL, p == NONE_LABEL, zero_division=0)), 4),
    }


def choose_on_train(clf: Classifier, texts, gold, descriptions, draws) -> tuple[dict, dict[str, float]]:
    """The few-shot method (in-scope accuracy on train rows that are not examples, per k) and each label-set
    mode's out-of-scope threshold (best train macro-F1, the smallest on ties)."""
    method_table: dict[str, dict[str, float]] = {}
    for k, draw in draws.items():
        used = {i for idx in draw.values() for i in idx}
        rest = [i for i, label in enumerate(gold) if i not in used and label != NONE_LABEL]
        for method in FEW_SHOT_METHODS:
            for with_desc in (True, False):
                labels = tuple(
                    LabelSpec(n, d if with_desc else None, tuple(texts[i] for i in draw[n]))
                    for n, d in descriptions.items()
                )
                pred = predict(sims_of(clf, [texts[i] for i in rest], labels, method), labels, None)
                acc = float(np.mean([p == gold[i] for p, i in zip(pred, rest, strict=True)]))
                method_table.setdefault(f"{method}{'' if with_desc else ', examples only'}", {})[f"k={k}"] = round(
                    acc, 4
                )
    thresholds = {}
    for mode, labels in modes(descriptions, texts, draws).items():
        if labels is None:
            continue
        used = {t for lab in labels for t in lab.examples}
        rows = [i for i, t in enumerate(texts) if t not in used]
        sims = sims_of(clf, [texts[i] for i in rows], labels, clf.few_shot)
        g = [gold[i] for i in rows]
        f1 = {float(t): scores(g, predict(sims, labels, float(t)))["macro_f1"] for t in THRESHOLDS}
        thresholds[mode] = min(t for t, s in f1.items() if s == max(f1.values()))
    return method_table, thresholds


def evaluate(clf: Classifier, texts, mode_labels, thresholds, repeats: int) -> dict[str, dict]:
    """Per mode: answers on ``texts`` through ``Classifier.run`` and inputs per second."""
    out = {}
    for mode, labels in mode_labels.items():
        items = [ClassifyItem(t, labels, threshold=thresholds.get(mode)) for t in texts]
        clf.run(items[:32])  # label embeddings cached, as a repeated label set is in service
        best = float("inf")
        results: list[ClassResult] = []
        for _ in range(repeats):
            start = time.perf_counter()
            results = [r for i in range(0, len(items), 32) for r in clf.run(items[i : i + 32])]  # type: ignore[misc]
            best = min(best, time.perf_counter() - start)
        out[mode] = {
            "pred": [answer_names(labels, r.label) for r in results],
            "inputs_per_s": round(len(items) / best, 1),
        }
    return out


def build(settings: Settings) -> Classifier:
    engines = Engines.build(settings)
    assert engines.classifier is not None
    return engines.classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("load_tests/results/classify_quality"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quantize", default="auto", help="the compressed setting to confirm (default: the server's)")
    args = ap.parse_args()
    torch.manual_seed(0)
    descriptions: dict[str, str] = json.loads((DATA / "intent_labels.json").read_text())
    tr_in, gold_in = read(DATA / "intents.jsonl")
    tr_oos, gold_oos = read(DATA / "intents_oos.jsonl")
    train_texts, train_gold = tr_in + tr_oos, gold_in + gold_oos
    test_texts, test_gold = read(DATA / "intents_test.jsonl")
    assert not set(train_texts) & set(test_texts), "train and test splits share messages"
    draws = {k: {n: idx[:k] for n, idx in draw_examples(train_texts, train_gold, max(KS)).items()} for k in KS}

    with tempfile.TemporaryDirectory() as tmp:
        base = {"enable_generate": False, "cls_model": "default", "cache_dir": str(Path(tmp) / "cache")}
        float_clf = build(Settings(**base, cls_quantize="none", cls_prune=0.0))
        method_table, thresholds = choose_on_train(float_clf, train_texts, train_gold, descriptions, draws)
        start = time.perf_counter()
        fit = train(train_texts, train_gold, float_clf.embed(train_texts))
        fit.head.save(Path(tmp) / "head")
        head_seconds = time.perf_counter() - start
        mode_labels = modes(descriptions, train_texts, draws)
        runs, fidelity = {}, {}
        for setting, quantize in (("float", "none"), ("default", args.quantize)):
            settings = Settings(**{**base, "cls_model": str(Path(tmp) / "head")}, cls_quantize=quantize)
            engines = Engines.build(settings)
            assert engines.classifier is not None
            fidelity[setting] = engines.reports["classify"].model_dump(mode="json")
            runs[setting] = evaluate(engines.classifier, test_texts, mode_labels, thresholds, args.repeats)
            if setting == "float":
                float_emb = engines.classifier.embed(test_texts)
            else:
                cosine = float((float_emb * engines.classifier.embed(test_texts)).sum(-1).mean())
            del engines

    table = []
    for mode in mode_labels:
        f, d = runs["float"][mode], runs["default"][mode]
        agree = float(np.mean([a == b for a, b in zip(f["pred"], d["pred"], strict=True)]))
        table.append(
            {
                "mode": mode,
                "threshold": thresholds.get(mode, fit.head.threshold),
                "float": {**scores(test_gold, f["pred"]), "inputs_per_s": f["inputs_per_s"]},
                "default": {**scores(test_gold, d["pred"]), "inputs_per_s": d["inputs_per_s"]},
                "label_agreement": round(agree, 4),
                "disagreements": int(sum(a != b for a, b in zip(f["pred"], d["pred"], strict=True))),
            }
        )
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "cpu": _cpu(),
        "torch_threads": torch.get_num_threads(),
        "train_rows": len(train_texts),
        "test_rows": len(test_texts),
        "test_per_label": {label: test_gold.count(label) for label in sorted(set(test_gold))},
        "few_shot_method": float_clf.few_shot,
        "few_shot_method_on_train": method_table,
        "thresholds_on_train": thresholds,
        "head": {**fit.report, "fit_seconds_incl_embedding": round(head_seconds, 2)},
        "test_embedding_cosine_default_vs_float": round(cosine, 5),
        "compression": {k: {"method": v.get("method"), "fidelity": v.get("fidelity")} for k, v in fidelity.items()},
        "table": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["table"], indent=2))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        cpus = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("CPU(s)"))
        return f"{name}, {cpus} CPUs"
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
