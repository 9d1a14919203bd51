"""Train-split search over label-set scoring variants (issue 13: few-shot k=5 and described zero-shot targets).

    HF_HUB_OFFLINE=1 python -m load_tests.classify_search [--episodes 100] [--out load_tests/results/classify_quality]

Uses the train split only (data/intents.jsonl + data/intents_oos.jsonl; the test split is not read). Each variant
scores label sets as ``Classifier.run`` does (centered on the background, weighted prototypes, ranking and gate
from the last and the early layer) except for the one thing it changes. Per mode (zero-shot with the
descriptions of data/intent_labels.json; few-shot k = 1, 5, 10 plus the description) and over ``--episodes``
random draws of examples (the draws of ``classify_quality.choose_weights``: seeds 1000-1099), the rows scored are
the train messages that are not examples; each variant gets its own out-of-scope threshold (best mean macro-F1
over the draws, as ``classify_quality`` chooses them), and is reported by accuracy and out-of-scope F1 at it, and
by its accuracy difference from the served scoring paired by draw (mean and standard error).
Generic statistics (whitening, IDF, background neighbours) come from data/calibration.txt and
engine/background.txt only.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from engine.classifier import BACKGROUND, DESCRIPTION_WEIGHT, RANK_EARLY_WEIGHT, Classifier
from load_tests.classify_quality import DATA, KS, THRESHOLDS, _cpu, _git, build, random_draws, read, threshold_metrics
from models.classifier_head import NONE_LABEL, early_layer
from server.config import Settings

Scorer = Callable[[np.ndarray, dict[str, list[int]]], tuple[np.ndarray, np.ndarray]]
W, A = DESCRIPTION_WEIGHT, RANK_EARLY_WEIGHT


def nz(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Tokens:
    """Per text: token ids and the hidden states of the last and the early layer ``[2, T, d]`` (one forward)."""

    def __init__(self, clf: Classifier) -> None:
        self.clf, self.memo = clf, {}
        self.layers = (-1, early_layer(clf.encoder.config.num_hidden_layers))

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        new = sorted(set(texts) - self.memo.keys(), key=len)
        for i in range(0, len(new), 32):
            batch = new[i : i + 32]
            inputs = self.clf._tokenize(batch)
            hidden = self.clf.encoder(**inputs, output_hidden_states=True).hidden_states
            states = torch.stack([hidden[j] for j in self.layers], 1).float().numpy()
            for r, text in enumerate(batch):
                n = int(inputs["attention_mask"][r].sum())
                self.memo[text] = (inputs["input_ids"][r, :n].numpy(), states[r, :, :n])
        return [self.memo[t] for t in texts]

    def pool(self, texts: Sequence[str], weigh: Callable[[list[int]], np.ndarray] | None = None) -> np.ndarray:
        """``[n, 2, d]``: per layer the (token-weighted) mean, L2-normalized; unweighted: the served features."""
        out = []
        for ids, states in self(texts):
            w = np.ones(len(ids)) if weigh is None else weigh(ids.tolist())
            w = w if w.sum() > 0 else np.ones(len(ids))
            out.append(nz((w[None, :, None] * states).sum(1) / w.sum()))
        return np.stack(out)


class Search:
    """The train split's features and the served scoring, with hooks for variants."""

    def __init__(self, clf: Classifier, episodes: int) -> None:
        self.descriptions: dict[str, str] = json.loads((DATA / "intent_labels.json").read_text())
        self.names = list(self.descriptions)
        tr_in, g_in = read(DATA / "intents.jsonl")
        tr_oos, g_oos = read(DATA / "intents_oos.jsonl")
        self.texts, self.gold = tr_in + tr_oos, g_in + g_oos
        self.draws = random_draws(self.texts, self.gold, episodes)
        self.tok = Tokens(clf)
        self.calibration = [
            line.strip() for line in (DATA / "calibration.txt").read_text().splitlines() if len(line.split()) >= 4
        ]
        served = clf.features(self.texts[:16]).reshape(16, 2, -1).numpy()
        assert np.allclose(self.tok.pool(self.texts[:16]), served, atol=1e-4), "pooling differs from the served one"
        self.feats = self.features()

    def features(self, weigh=None) -> dict[str, np.ndarray]:
        """Pooled features of the train texts, the descriptions and the background; its mean: the center."""
        pool = self.tok.pool
        f = {
            "texts": pool(self.texts, weigh),
            "desc": pool([self.descriptions[n] for n in self.names], weigh),
            "bg": pool(BACKGROUND, weigh),
        }
        f["center"] = f["bg"].mean(0)
        return f

    def centered(self, x: np.ndarray, f: dict[str, np.ndarray]) -> np.ndarray:
        return nz(x - f["center"])

    def scorer(
        self,
        feats: dict[str, np.ndarray] | None = None,
        desc: np.ndarray | None = None,
        transform: Callable[[np.ndarray, int], np.ndarray] | None = None,
        example_weights: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
        gate_mix: float = 1.0,
        extra: Callable[[np.ndarray, dict[str, list[int]], np.ndarray, np.ndarray], tuple] | None = None,
    ) -> Scorer:
        """The served scoring (``label_scores`` with ``"prototype"``), each keyword replacing one of its parts:
        ``feats`` pooled otherwise, ``desc`` the descriptions' centered features ``[L, 2, d]``, ``transform`` of
        centered unit vectors per layer, per-example weights (``example_weights(examples, all labels' plain
        prototypes, label index)``), the early layer's share of the gate, ``extra`` adjusting (ranking, gate)."""
        f = feats or self.feats
        X = self.centered(f["texts"], f)
        D = self.centered(f["desc"], f) if desc is None else desc
        if transform is not None:
            X = np.stack([transform(X[:, h], h) for h in range(2)], 1)
            D = np.stack([transform(D[:, h], h) for h in range(2)], 1)

        def score(rows: np.ndarray, ex: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
            cos = []
            for h in range(2):
                protos = []
                plain = np.stack(
                    [nz(X[ex[n], h].sum(0) + W * D[j, h]) if ex[n] else D[j, h] for j, n in enumerate(self.names)]
                )
                for j, n in enumerate(self.names):
                    if not ex[n]:
                        protos.append(D[j, h])
                        continue
                    vecs = X[ex[n], h]
                    w = np.ones(len(vecs)) if example_weights is None else example_weights(vecs, plain, j)
                    protos.append(nz((w[:, None] * vecs).sum(0) + W * D[j, h]))
                cos.append(X[rows, h] @ np.stack(protos).T)
            rank = (cos[0] + A * cos[1]) / (1 + A)
            gate = (cos[0] + gate_mix * cos[1]) / (1 + gate_mix)
            return (rank, gate) if extra is None else extra(rows, ex, rank, gate)

        return score

    def evaluate(self, scorer: Scorer, ks: Sequence[int] = (0, *KS)) -> dict[str, dict]:
        """Per mode: accuracy (mean, sd over draws), out-of-scope F1 and the threshold at the best mean macro-F1;
        the per-draw accuracies under ``_per_draw`` (for paired differences)."""
        out = {}
        for k in ks:
            accs, f1s, oos = [], [], []
            for draw in [self.draws[s][k] for s in self.draws] if k else [{n: [] for n in self.names}]:
                ex = {n: list(draw[n]) for n in self.names}
                used = {i for rows in ex.values() for i in rows}
                rows = np.array([i for i in range(len(self.texts)) if i not in used])
                rank, gate = scorer(rows, ex)
                g = np.array(
                    [self.names.index(x) if x != NONE_LABEL else len(self.names) for x in np.array(self.gold)[rows]]
                )
                a, m, o = sweep(rank, gate, g)
                accs.append(a), f1s.append(m), oos.append(o)
            t = int(np.argmax(np.mean(f1s, 0)))
            per = np.array(accs)[:, t]
            out["zero-shot, descriptions" if k == 0 else f"few-shot, k={k}"] = {
                "accuracy": round(float(per.mean()), 4),
                "sd": round(float(per.std()), 4),
                "oos_f1": round(float(np.mean(np.array(oos)[:, t])), 4),
                "threshold": float(THRESHOLDS[t]),
                "_per_draw": per,
            }
        return out


def sweep(rank: np.ndarray, gate: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, macro-F1 and out-of-scope F1 at every threshold (``none`` = index L)."""
    idx = rank.argmax(1)
    m = threshold_metrics(idx, gate[np.arange(len(idx)), idx], g, rank.shape[1])
    return m["accuracy"], m["macro_f1"], m["oos_f1"]


def variants(s: Search) -> dict[str, tuple[Scorer, Sequence[int]]]:
    """name -> (scorer, modes: 0 = zero-shot with descriptions, else k)."""
    all_modes, names, f = (0, *KS), s.names, s.feats
    out: dict[str, tuple[Scorer, Sequence[int]]] = {"served": (s.scorer(), all_modes)}

    # The label text: templates around the description, averaged with the plain one or alone.
    templates = {
        "This message is {d}": ["This message is {d}"],
        "a customer message about {d}": ["a customer message about {d}"],
        "{name}: {d}": ["{n}: {d}"],
        "mean of {d} and 'a customer message about {d}'": ["{d}", "a customer message about {d}"],
        "mean of {d}, 'a customer message: {d}', 'a customer message about {d}'": [
            "{d}",
            "a customer message: {d}",
            "a customer message about {d}",
        ],
    }
    for name, forms in templates.items():
        vecs = [
            s.centered(s.tok.pool([t.format(d=s.descriptions[n], n=n.replace("_", " ")) for n in names]), f)
            for t in forms
        ]
        out[f"label text: {name}"] = (s.scorer(desc=nz(np.sum(vecs, 0))), all_modes)

    # Whitening with the shrunk covariance of generic text (calibration.txt and the background), centered.
    generic = s.centered(s.tok.pool(s.calibration + list(BACKGROUND)), f)
    for lam, power in ((0.9, 0.25), (0.6, 0.5), (0.9, 1.0)):
        mats = []
        for h in range(2):
            cov = np.cov(generic[:, h].T)
            cov = (1 - lam) * cov + lam * np.trace(cov) / len(cov) * np.eye(len(cov))
            ev, u = np.linalg.eigh(cov)
            mats.append(u @ np.diag(ev ** (-power / 2)) @ u.T)
        out[f"generic whitening, shrinkage {lam}, power {power}"] = (
            s.scorer(transform=lambda x, h, m=mats: nz(x @ m[h])),
            all_modes,
        )

    # Pooling: special tokens or punctuation left out, or tokens weighted by IDF over generic text.
    tokenizer = s.tok.clf.tokenizer
    special = set(tokenizer.all_special_ids)
    punct = {i for t, i in tokenizer.vocab.items() if not any(ch.isalnum() for ch in t)}
    df = collections.Counter(t for ids, _ in s.tok(s.calibration + list(BACKGROUND)) for t in set(ids.tolist()))
    n_docs = len(s.calibration) + len(BACKGROUND)
    pools = {
        "pooling without [CLS]/[SEP]": lambda ids: np.array([float(i not in special) for i in ids]),
        "pooling without [CLS]/[SEP] and punctuation": lambda ids: np.array(
            [float(i not in special and i not in punct) for i in ids]
        ),
        "pooling weighted by sqrt(IDF) of generic text": lambda ids: np.array(
            [math.log((n_docs + 1) / (df[i] + 1)) ** 0.5 + 1e-3 for i in ids]
        ),
    }
    for name, weigh in pools.items():
        out[name] = (s.scorer(feats=s.features(weigh)), all_modes)

    # Out-of-scope gate: minus a share of the input's best cosine to a background text; other early-layer shares.
    bg = s.centered(f["bg"], f)
    x = s.centered(f["texts"], f)
    near_bg = np.mean([(x[:, h] @ bg[:, h].T).max(1) for h in range(2)], 0)
    for gamma in (-0.2, 0.1, 0.2):
        out[f"gate minus {gamma} x best background cosine"] = (
            s.scorer(extra=lambda rows, ex, r, g, gm=gamma: (r, g - gm * near_bg[rows, None])),
            all_modes,
        )
    for mix in (0.5, 2.0):
        out[f"gate: last + {mix} x early layer"] = (s.scorer(gate_mix=mix), all_modes)

    # Few-shot: examples weighted by typicality (cosine to their label's prototype) or margin over other labels.
    def typicality(tau: float, margin: bool):
        def weigh(vecs: np.ndarray, plain: np.ndarray, j: int) -> np.ndarray:
            sims = vecs @ plain.T
            score = sims[:, j] - (np.delete(sims, j, axis=1).max(1) if margin else 0)
            w = np.exp(tau * (score - score.max()))
            return w / w.mean()

        return weigh

    for tau, margin in ((-3, False), (3, False), (3, True)):
        name = f"examples weighted exp({tau} x {'margin over other labels' if margin else 'cosine to prototype'})"
        out[name] = (s.scorer(example_weights=typicality(tau, margin)), KS)

    # Per-label out-of-scope bar moved by how tight its examples are (leave-one-out cosine to the prototype).
    def tightness(gamma: float):
        def adjust(rows, ex, rank, gate):
            tight = []
            for n in names:
                per = []
                for h in range(2):
                    vecs, total = x[ex[n], h], x[ex[n], h].sum(0) + W * s.centered(f["desc"], f)[names.index(n), h]
                    per.append(np.mean([nz(total - v) @ v for v in vecs]) if len(vecs) > 1 else 0.0)
                tight.append(np.mean(per))
            t = np.array(tight)
            return rank, gate - gamma * (t - t.mean())[None]

        return adjust

    for gamma in (-0.25, 0.25):
        out[f"per-label bar + {gamma} x tightness"] = (s.scorer(extra=tightness(gamma)), (5, 10))

    # Ranking: dimensions weighted by the variance of the label set's prototypes (power 0.25), gate as served.
    def dimension_weights(rows, ex, rank, gate):
        cos = []
        d = s.centered(f["desc"], f)
        for h in range(2):
            protos = np.stack([nz(x[ex[n], h].sum(0) + (W if ex[n] else 1) * d[j, h]) for j, n in enumerate(names)])
            v = protos.var(0)
            scale = np.sqrt((v / v.mean()) ** 0.25)
            cos.append(nz(x[rows, h] * scale) @ nz(protos * scale).T)
        return (cos[0] + A * cos[1]) / (1 + A), gate

    out["ranking in dimensions weighted by the prototypes' variance^0.25"] = (
        s.scorer(extra=dimension_weights),
        all_modes,
    )

    # Few-shot: a logistic regression fitted per label set on its examples and description (weight W), its
    # probability (or centered logit) added to the ranking; the gate as served.
    flat = x.reshape(len(x), -1)
    dflat = s.centered(f["desc"], f).reshape(len(names), -1)

    def logistic(beta: float, kind: str):
        def adjust(rows, ex, rank, gate):
            feats = np.concatenate([flat[[i for n in names for i in ex[n]]], dflat])
            y = [j for j, n in enumerate(names) for _ in ex[n]] + list(range(len(names)))
            weight = [1.0] * (len(y) - len(names)) + [W] * len(names)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = LogisticRegression(C=10, max_iter=500).fit(feats, y, sample_weight=weight)
            if kind == "probability":
                extra = model.predict_proba(flat[rows])
            else:
                extra = model.decision_function(flat[rows])
                extra = extra - extra.mean(1, keepdims=True)
            return rank + beta * extra, gate

        return adjust

    for beta, kind in ((0.1, "probability"), (0.03, "logit")):
        out[f"ranking + {beta} x logistic regression {kind} (C=10, per label set)"] = (
            s.scorer(extra=logistic(beta, kind)),
            KS,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("load_tests/results/classify_quality"))
    ap.add_argument("--name", default="search_train.json")
    ap.add_argument("--episodes", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = {"enable_generate": False, "cls_model": "default", "cache_dir": str(Path(tmp) / "cache")}
        clf = build(Settings(**base, cls_quantize="none", cls_prune=0.0))
        search = Search(clf, args.episodes)
        results: dict[str, dict] = {}
        served: dict[str, np.ndarray] = {}
        for name, (scorer, ks) in variants(search).items():
            res = search.evaluate(scorer, ks)
            served = served or {mode: row["_per_draw"] for mode, row in res.items()}
            for mode, row in res.items():
                diff = row.pop("_per_draw") - served[mode]
                row["minus_served"] = round(float(diff.mean()), 4)
                row["minus_served_se"] = round(float(diff.std() / math.sqrt(len(diff))), 4)
            results[name] = res
            print(name, {m: (r["accuracy"], r["minus_served"]) for m, r in res.items()}, flush=True)
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "cpu": _cpu(),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - start, 1),
        "split": "train only (data/intents.jsonl + data/intents_oos.jsonl)",
        "episodes": args.episodes,
        "served": {"description_weight": W, "rank_early_weight": A},
        "variants": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / args.name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
