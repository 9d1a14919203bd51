"""Classification quality and speed per mode, float against the default compression (issue 13's table).

    python -m load_tests.classify_quality [--out load_tests/results/classify_quality]

Modes: zero-shot with bare label names and with the descriptions of data/intent_labels.json; few-shot with
k = 1, 5, 10 examples per intent (drawn from the train split, seed 0) plus the description; the trained head
(models/train_classifier.py on the train split). Everything that is chosen is chosen on the train split
(data/intents.jsonl + data/intents_oos.jsonl), over draws of examples with seeds 0-4 (examples left out of what
they score): the background that label-set scoring centers on, the few-shot scoring method, each mode's
out-of-scope threshold (best mean macro-F1), what that threshold is compared with (the best label's cosine, or
its cosine averaged with the early layer's: ``label_scores``), the head; over ``--episodes`` further random draws
per k, the description's weight in a prototype and the early layer's share of the ranking (``DESCRIPTION_WEIGHT``,
``RANK_EARLY_WEIGHT``). Every figure of the table is on the test split (data/intents_test.jsonl), through
``Classifier.run`` as /classify runs it, for the encoder built by the server's builder once with
``--cls-quantize none`` and once with ``--quantize``; few-shot test accuracy is also given over the five draws and
over ``--episodes`` random draws (float). Throughput: test inputs per second through ``Classifier.run`` in batches
of 32 and of 1, label embeddings already cached, modes interleaved in each of ``--repeats`` rounds, the median.
"""

from __future__ import annotations

import argparse
import json
import os
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

from engine.classifier import (
    BACKGROUND,
    DESCRIPTION_WEIGHT,
    FEW_SHOT_METHODS,
    RANK_EARLY_WEIGHT,
    Classifier,
    ClassifyItem,
    ClassResult,
    LabelSpec,
    label_scores,
)
from models.classifier_head import NONE_LABEL
from models.train_classifier import train
from server.config import Settings
from server.runtime import Engines

DATA = Path(__file__).resolve().parent.parent / "data"
KS = (1, 5, 10)
SEEDS = range(5)  # example draws: choices on train are averaged over them; test few-shot reported over them
THRESHOLDS = np.round(np.arange(0.0, 0.91, 0.01), 2)
# The grid over which DESCRIPTION_WEIGHT and RANK_EARLY_WEIGHT were chosen (choose_weights).
DESCRIPTION_WEIGHTS = (1.0, 2.0, 3.0)
RANK_EARLY_WEIGHTS = (0.0, 0.1, 0.25, 0.5)


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


def random_draws(texts, gold, episodes: int, first_seed: int = 1000) -> dict[int, dict[int, dict[str, list[int]]]]:
    """``episodes`` independent draws per k (seed -> k -> intent -> rows), apart from the seeds 0-4 of the table."""
    return {
        seed: {k: draw_examples(texts, gold, k, seed * 100 + k) for k in KS}
        for seed in range(first_seed, first_seed + episodes)
    }


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


def embed_memo(clf: Classifier, texts: Sequence[str]) -> torch.Tensor:
    """Pooled features of ``texts`` (``Classifier.features``), every text encoded once per classifier (memoized)."""
    memo = _memo.setdefault(id(clf), {})
    new = sorted(set(texts) - memo.keys())
    for i in range(0, len(new), 32):
        memo.update(zip(new[i : i + 32], clf.features(new[i : i + 32]), strict=True))
    return torch.stack([memo[t] for t in texts])


def sims_of(
    clf: Classifier,
    texts: Sequence[str],
    labels: tuple[LabelSpec, ...],
    method: str,
    center: torch.Tensor | None,
    description_weight: float = DESCRIPTION_WEIGHT,
    early_weight: float = RANK_EARLY_WEIGHT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranking, gate) similarities as Classifier.run computes them (with the background mean ``center``)."""
    emb = embed_memo(clf, texts)
    sets = [embed_memo(clf, lab.texts) for lab in labels]
    weights = [lab.weights(description_weight) for lab in labels]
    return label_scores(emb, sets, method, center, weights, early_weight)


_memo: dict[int, dict[str, torch.Tensor]] = {}


def predict(
    scored: tuple[torch.Tensor, torch.Tensor], labels: tuple[LabelSpec, ...], threshold: float | None, gate: bool = True
) -> list[str]:
    """Answers as ``similarity_results`` gives them: the best-ranked label, ``none`` when its gate score (with
    ``gate``; else its ranking score) is under ``threshold``."""
    sims, gates = scored
    idx = sims.argmax(dim=-1)
    best = (gates if gate else sims).gather(-1, idx[:, None])[:, 0]
    names = [answer_names(labels, lab.name) for lab in labels]
    return [
        NONE_LABEL if threshold is not None and b < threshold else names[i]
        for b, i in zip(best.tolist(), idx.tolist(), strict=True)
    ]


def sweep(
    scored: tuple[torch.Tensor, torch.Tensor], labels: tuple[LabelSpec, ...], gold: Sequence[str]
) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and out-of-scope F1 of ``predict`` at every threshold of THRESHOLDS at once (as
    ``scores`` gives them, macro-F1 over the labels in gold or answers): for searches over many draws."""
    sims, gates = scored
    idx = sims.argmax(dim=-1)
    best = gates.gather(-1, idx[:, None])[:, 0].numpy()
    names = [answer_names(labels, lab.name) for lab in labels] + [NONE_LABEL]
    g = np.array([names.index(x) if x in names else -1 for x in gold])
    return threshold_metrics(idx.numpy(), best, g, len(labels))


def threshold_metrics(idx: np.ndarray, best: np.ndarray, g: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and out-of-scope F1 at every threshold of THRESHOLDS at once, of answers ``idx``
    (label indices) whose gate score ``best`` under a threshold makes them out of scope (index ``n_labels``),
    against gold indices ``g``."""
    p = np.where(best[None, :] < THRESHOLDS[:, None], n_labels, idx[None, :])  # [thresholds, n]
    f1 = np.zeros((len(THRESHOLDS), n_labels + 1))
    present = np.zeros_like(f1, dtype=bool)
    for c in range(n_labels + 1):
        tp = ((p == c) & (g == c)).sum(1)
        fp = ((p == c) & (g != c)).sum(1)
        fn = ((p != c) & (g == c)).sum(1)
        present[:, c] = tp + fp + fn > 0
        f1[:, c] = np.where(present[:, c], 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return {
        "accuracy": (p == g[None, :]).mean(1),
        "macro_f1": f1.sum(1) / present.sum(1),
        "oos_f1": f1[:, -1],
    }


def choose_weights(clf: Classifier, texts, gold, descriptions, draws, zero_modes) -> dict[str, dict[str, float]]:
    """Per (description weight, early-layer share of the ranking) on the train split: each label-set mode's
    accuracy at its best threshold (best mean macro-F1 over ``draws``, the random draws of examples; examples
    left out of what they score), its spread over draws, and the mean over the modes."""
    table: dict[str, dict[str, float]] = {}
    for w in DESCRIPTION_WEIGHTS:
        for a in RANK_EARLY_WEIGHTS:
            row: dict[str, float] = {}
            for mode, sets in [*zero_modes.items(), *[(f"few-shot, k={k}", None) for k in KS]]:
                sweeps = []
                for draw in draws.values() if sets is None else [None]:
                    labels = sets
                    if labels is None:
                        k = int(mode.rsplit("=", 1)[1])
                        labels = tuple(
                            LabelSpec(n, d, tuple(texts[i] for i in draw[k][n])) for n, d in descriptions.items()
                        )
                    rows = train_rows(gold, labels, texts)
                    scored = sims_of(clf, [texts[i] for i in rows], labels, clf.few_shot, clf.center(), w, a)
                    sweeps.append(sweep(scored, labels, [gold[i] for i in rows]))
                t = int(np.argmax(np.mean([s["macro_f1"] for s in sweeps], axis=0)))
                accs = [s["accuracy"][t] for s in sweeps]
                row[mode] = round(float(np.mean(accs)), 4)
                if len(accs) > 1:
                    row[f"{mode} sd"] = round(float(np.std(accs)), 4)
            mean = float(np.mean([v for m, v in row.items() if not m.endswith(" sd")]))
            table[f"description weight {w:g}, early layer {a:g}"] = {**row, "mean": round(mean, 4)}
    return table


def scores(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    g, p = np.array(gold), np.array(pred)
    return {
        "accuracy": round(float((g == p).mean()), 4),
        "in_scope_accuracy": round(float((g == p)[g != NONE_LABEL].mean()), 4),
        "macro_f1": round(float(f1_score(g, p, average="macro", zero_division=0)), 4),
        "oos_f1": round(float(f1_score(g == NONE_LABEL, p == NONE_LABEL, zero_division=0)), 4),
    }


def center_options(clf: Classifier) -> dict[str, torch.Tensor | None]:
    """What label-set scoring may subtract: nothing, the empty string's embedding, the mean of all of
    data/calibration.txt, the mean of its prose paragraphs (engine/background.txt, the served one)."""
    cal = [line.strip() for line in (DATA / "calibration.txt").read_text().splitlines() if len(line.split()) >= 4]
    return {
        "none": None,
        "empty string": embed_memo(clf, [""])[0],
        "calibration.txt, all": embed_memo(clf, cal).mean(0),
        "background (calibration.txt prose, served)": embed_memo(clf, BACKGROUND).mean(0),
    }


def train_rows(gold, labels: tuple[LabelSpec, ...], texts) -> list[int]:
    """Train rows that are not examples of ``labels``."""
    used = {t for lab in labels for t in lab.examples}
    return [i for i, t in enumerate(texts) if t not in used]


def best_threshold(f1_by_threshold: list[dict[float, float]]) -> float:
    """The threshold of best mean macro-F1 over draws (the smallest on ties)."""
    mean = {t: float(np.mean([f1[t] for f1 in f1_by_threshold])) for t in f1_by_threshold[0]}
    return min(t for t, s in mean.items() if s == max(mean.values()))


def choose_on_train(clf: Classifier, texts, gold, descriptions, draws) -> tuple[dict, dict, dict, dict[str, float]]:
    """On the train split, averaged over the example draws ``draws`` (seed -> k -> intent -> rows): the background
    and what the threshold is compared with (accuracy and out-of-scope F1 at each mode's best threshold, per
    label-set mode), the few-shot method (in-scope accuracy on rows that are not examples, per k) and each
    label-set mode's out-of-scope threshold (best mean macro-F1)."""
    mode_sets = {seed: modes(descriptions, texts, d) for seed, d in draws.items()}
    label_modes = [m for m, labels in mode_sets[0].items() if labels is not None]

    def accuracy_at_best_threshold(
        mode: str, method: str, center: torch.Tensor | None, gate: bool = True
    ) -> tuple[float, float, float]:
        per_draw, f1s = [], []
        for sets in mode_sets.values():
            labels = sets[mode]
            assert labels is not None
            rows = train_rows(gold, labels, texts)
            sims = sims_of(clf, [texts[i] for i in rows], labels, method, center)
            g = [gold[i] for i in rows]
            per_draw.append({float(t): scores(g, predict(sims, labels, float(t), gate)) for t in THRESHOLDS})
            f1s.append({t: sc["macro_f1"] for t, sc in per_draw[-1].items()})
        t = best_threshold(f1s)
        mean = {metric: float(np.mean([d[t][metric] for d in per_draw])) for metric in ("accuracy", "oos_f1")}
        return t, mean["accuracy"], mean["oos_f1"]

    center_table: dict[str, dict[str, float]] = {}
    for name, center in center_options(clf).items():
        row = {mode: round(accuracy_at_best_threshold(mode, clf.few_shot, center)[1], 4) for mode in label_modes}
        center_table[name] = {**row, "mean": round(float(np.mean(list(row.values()))), 4)}

    gate_table: dict[str, dict[str, list[float]]] = {}
    for name, gate in (("best label's cosine", False), ("its cosine averaged with the early layer's (served)", True)):
        found = {mode: accuracy_at_best_threshold(mode, clf.few_shot, clf.center(), gate) for mode in label_modes}
        gate_table[name] = {mode: [t, round(acc, 4), round(f1, 4)] for mode, (t, acc, f1) in found.items()}

    method_table: dict[str, dict[str, float]] = {}
    for k in KS:
        for method in FEW_SHOT_METHODS:
            for with_desc in (True, False):
                accs = []
                for draw in draws.values():
                    labels = tuple(
                        LabelSpec(n, d if with_desc else None, tuple(texts[i] for i in draw[k][n]))
                        for n, d in descriptions.items()
                    )
                    rest = [i for i in train_rows(gold, labels, texts) if gold[i] != NONE_LABEL]
                    scored = sims_of(clf, [texts[i] for i in rest], labels, method, clf.center())
                    pred = predict(scored, labels, None)
                    accs.append(float(np.mean([p == gold[i] for p, i in zip(pred, rest, strict=True)])))
                key = f"{method}{'' if with_desc else ', examples only'}"
                method_table.setdefault(key, {})[f"k={k}"] = round(float(np.mean(accs)), 4)

    thresholds = {mode: accuracy_at_best_threshold(mode, clf.few_shot, clf.center())[0] for mode in label_modes}
    return center_table, gate_table, method_table, thresholds


def few_shot_over_draws(clf: Classifier, texts, gold, test_texts, test_gold, descriptions, draws, thresholds):
    """Test figures of few-shot at each k for every draw of examples (float, through label_scores)."""
    out = {}
    for k in KS:
        per = [
            scores(test_gold, predict(sims_of(clf, test_texts, lab, clf.few_shot, clf.center()), lab, thresholds[m]))
            for d in draws.values()
            for m, lab in [(f"few-shot, k={k}", modes(descriptions, texts, d)[f"few-shot, k={k}"])]
            if lab is not None
        ]
        out[f"few-shot, k={k}"] = {
            metric: {
                "mean": round(float(np.mean([p[metric] for p in per])), 4),
                "sd": round(float(np.std([p[metric] for p in per])), 4),
                "min": min(p[metric] for p in per),
                "max": max(p[metric] for p in per),
            }
            for metric in ("accuracy", "macro_f1", "oos_f1")
        }
    return out


def evaluate(clf: Classifier, texts, mode_labels, thresholds, repeats: int, timed: int) -> dict[str, dict]:
    """Per mode: answers on ``texts`` through ``Classifier.run`` (batches of 32), then inputs per second on the
    first ``timed`` texts in batches of 32 and of 1, modes interleaved in each of ``repeats`` rounds (median)."""
    out: dict[str, dict] = {}
    items = {
        m: [ClassifyItem(t, labels, threshold=thresholds.get(m)) for t in texts] for m, labels in mode_labels.items()
    }
    for mode, labels in mode_labels.items():
        results: list[ClassResult] = [r for i in range(0, len(texts), 32) for r in clf.run(items[mode][i : i + 32])]  # type: ignore[misc]
        out[mode] = {"pred": [answer_names(labels, r.label) for r in results]}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for mode in mode_labels:
            for batch in (32, 1):
                run = items[mode][:timed]
                start = time.perf_counter()
                for i in range(0, len(run), batch):
                    clf.run(run[i : i + batch])
                times.setdefault((mode, batch), []).append(time.perf_counter() - start)
    for (mode, batch), secs in times.items():
        out[mode][f"inputs_per_s_batch{batch}"] = round(timed / float(np.median(secs)), 1)
    return out


def build(settings: Settings) -> Classifier:
    engines = Engines.build(settings)
    assert engines.classifier is not None
    return engines.classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("load_tests/results/classify_quality"))
    ap.add_argument("--name", default="results.json", help="file name of the JSON written under --out")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (the median is reported)")
    ap.add_argument("--timed", type=int, default=64, help="test inputs per timing round and mode")
    ap.add_argument("--quantize", default="int8", help="the compressed setting to confirm against float")
    ap.add_argument("--episodes", type=int, default=100, help="random draws of examples per k (weights; test spread)")
    args = ap.parse_args()
    torch.manual_seed(0)
    descriptions: dict[str, str] = json.loads((DATA / "intent_labels.json").read_text())
    tr_in, gold_in = read(DATA / "intents.jsonl")
    tr_oos, gold_oos = read(DATA / "intents_oos.jsonl")
    train_texts, train_gold = tr_in + tr_oos, gold_in + gold_oos
    test_texts, test_gold = read(DATA / "intents_test.jsonl")
    assert not set(train_texts) & set(test_texts), "train and test splits share messages"
    all_draws = {
        seed: {k: {n: idx[:k] for n, idx in draw_examples(train_texts, train_gold, max(KS), seed).items()} for k in KS}
        for seed in SEEDS
    }

    with tempfile.TemporaryDirectory() as tmp:
        base = {"enable_generate": False, "cls_model": "default", "cache_dir": str(Path(tmp) / "cache")}
        float_clf = build(Settings(**base, cls_quantize="none", cls_prune=0.0))
        center_table, gate_table, method_table, thresholds = choose_on_train(
            float_clf, train_texts, train_gold, descriptions, all_draws
        )
        episodes = random_draws(train_texts, train_gold, args.episodes)
        zero_modes = {m: lab for m, lab in modes(descriptions, train_texts, all_draws[0]).items() if "zero" in m}
        weights_table = choose_weights(float_clf, train_texts, train_gold, descriptions, episodes, zero_modes)
        start = time.perf_counter()
        fit = train(train_texts, train_gold, float_clf.features(train_texts))
        fit.head.save(Path(tmp) / "head")
        head_seconds = time.perf_counter() - start
        over_draws = few_shot_over_draws(
            float_clf, train_texts, train_gold, test_texts, test_gold, descriptions, all_draws, thresholds
        )
        over_episodes = few_shot_over_draws(
            float_clf, train_texts, train_gold, test_texts, test_gold, descriptions, episodes, thresholds
        )
        mode_labels = modes(descriptions, train_texts, all_draws[0])
        runs, fidelity = {}, {}
        for setting, quantize in (("float", "none"), ("default", args.quantize)):
            settings = Settings(**{**base, "cls_model": str(Path(tmp) / "head")}, cls_quantize=quantize)
            engines = Engines.build(settings)
            assert engines.classifier is not None
            fidelity[setting] = engines.served.reports["classify"].model_dump(mode="json")
            runs[setting] = evaluate(engines.classifier, test_texts, mode_labels, thresholds, args.repeats, args.timed)
            if setting == "float":
                float_emb = engines.classifier.embed(test_texts)
            else:
                cosine = float((float_emb * engines.classifier.embed(test_texts)).sum(-1).mean())
            del engines

    table = []
    for mode in mode_labels:
        f, d = runs["float"][mode], runs["default"][mode]
        agree = float(np.mean([a == b for a, b in zip(f["pred"], d["pred"], strict=True)]))
        speed = ("inputs_per_s_batch32", "inputs_per_s_batch1")
        table.append(
            {
                "mode": mode,
                "threshold": thresholds.get(mode, fit.head.threshold),
                "float": {**scores(test_gold, f["pred"]), **{k: f[k] for k in speed}},
                "default": {**scores(test_gold, d["pred"]), **{k: d[k] for k in speed}},
                "label_agreement": round(agree, 4),
                "disagreements": int(sum(a != b for a, b in zip(f["pred"], d["pred"], strict=True))),
            }
        )
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "cpu": _cpu(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "compressed_setting": args.quantize,
        "train_rows": len(train_texts),
        "test_rows": len(test_texts),
        "test_per_label": {label: test_gold.count(label) for label in sorted(set(test_gold))},
        "background_on_train": center_table,
        "oos_gate_on_train_threshold_accuracy_oos_f1": gate_table,
        "few_shot_method": float_clf.few_shot,
        "description_weight": DESCRIPTION_WEIGHT,
        "rank_early_weight": RANK_EARLY_WEIGHT,
        "weights_on_train_over_episodes": {"episodes": args.episodes, "accuracy": weights_table},
        "few_shot_method_on_train": method_table,
        "thresholds_on_train": thresholds,
        "head": {**fit.report, "fit_seconds_incl_embedding": round(head_seconds, 2)},
        "few_shot_test_over_draws_float": over_draws,
        "few_shot_test_over_episodes_float": {"episodes": args.episodes, **over_episodes},
        "test_embedding_cosine_default_vs_float": round(cosine, 5),
        "compression": {k: {"method": v.get("method"), "fidelity": v.get("fidelity")} for k, v in fidelity.items()},
        "timing": {"inputs": args.timed, "rounds": args.repeats, "statistic": "median"},
        "table": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / args.name).write_text(json.dumps(result, indent=2) + "\n")
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
