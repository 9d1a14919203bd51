"""Where zero-shot multi-label scoring should put its threshold (engine/classifier.py
``DEFAULT_MULTI_LABEL_THRESHOLD``): cosines of the embedded MiniLM (unquantized, CPU) between each
customer-service message of data/intents.jsonl and each label of data/intent_labels.json, for the
message's own label and for the others, with labels as short names ("technical support") and as
the descriptions in that file.

    python -m load_tests.label_threshold --out load_tests/results/label_threshold/results.json
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.classifier import DEFAULT_MULTI_LABEL_THRESHOLD, Classifier
from models.loader import load_encoder
from server.config import default_cache_dir

DATA = Path(__file__).resolve().parent.parent / "data"
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def cosines(classifier: Classifier, texts: list[str], labels: list[str], truth: list[int]) -> dict[str, object]:
    """Quantiles of matching and non-matching text/label cosines, and how many fall on the wrong side of
    the threshold."""
    sims = classifier.embed(texts) @ classifier.embed(labels).T
    own = torch.zeros_like(sims, dtype=torch.bool)
    own[torch.arange(len(texts)), torch.tensor(truth)] = True
    matching, other = sims[own], sims[~own]
    q = torch.tensor(QUANTILES)
    return {
        "matching": [round(float(v), 3) for v in matching.quantile(q)],
        "other": [round(float(v), 3) for v in other.quantile(q)],
        "matching_below_threshold": f"{int((matching < DEFAULT_MULTI_LABEL_THRESHOLD).sum())}/{matching.numel()}",
        "other_above_threshold": f"{int((other >= DEFAULT_MULTI_LABEL_THRESHOLD).sum())}/{other.numel()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (DATA / "intents.jsonl").read_text().splitlines() if line.strip()]
    descriptions: dict[str, str] = json.loads((DATA / "intent_labels.json").read_text())
    names = list(descriptions)
    texts, truth = [r["text"] for r in rows], [names.index(r["label"]) for r in rows]
    classifier = Classifier(load_encoder("default", default_cache_dir(), torch.float32), "cpu")
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python -m load_tests.label_threshold --out {args.out}",
        "threshold": DEFAULT_MULTI_LABEL_THRESHOLD,
        "quantiles": QUANTILES,
        "texts": len(texts),
        "short_names": cosines(classifier, texts, [n.replace("_", " ") for n in names], truth),
        "descriptions": cosines(classifier, texts, list(descriptions.values()), truth),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
