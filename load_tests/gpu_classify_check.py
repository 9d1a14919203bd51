"""CUDA classification against the CPU on the same random MiniLM-shaped weights: zero-shot, few-shot and
out-of-scope scores through the captured encoder graphs (fp32 both sides) agree with the eager CPU path,
for the model directory (transformers' BERT) and for a compressed checkpoint of it (models/bert.py).
A device check, not a test (CI has no GPU)::

    python -m load_tests.gpu_classify_check --tokenizer MINILM_TOKENIZER_DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from engine.classifier import Classifier, ClassifyItem, LabelSpec
from load_tests.gpu_bench import dummy_encoder_dir
from models.checkpoint import read_checkpoint
from models.loader import LoadedEncoder, load_encoder

TEXTS = ["I was charged twice for my order", "where is my parcel?", "reset my password please", "hello"]
LABELS = (
    ("billing", "shipping", "account"),
    (
        LabelSpec("billing", "payments and refunds", ("double charge", "refund please")),
        LabelSpec("shipping", "delivery", ("late parcel", "tracking number")),
        LabelSpec("account", "login and profile", ("forgot password",), 0.2),
    ),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    model_dir = dummy_encoder_dir(args.tokenizer)
    checkpoint = Path(tempfile.mkdtemp()) / "checkpoint"
    compress = ["--task", "classify", "--quantize", "none", "--prune", "0", "--device", "cpu", "--dtype", "float32"]
    subprocess.run(
        [sys.executable, "-m", "models.compress", "--model", str(model_dir), "--out", str(checkpoint), *compress],
        check=True,
    )
    cpu = Classifier(load_encoder(str(model_dir), Path(tempfile.mkdtemp()), torch.float32), "cpu")
    result: dict[str, object] = {"gpu": torch.cuda.get_device_name()}
    from_checkpoint = read_checkpoint(checkpoint, "classify", torch.float32, torch.device("cuda"))
    encoders = {
        "model_dir": load_encoder(str(model_dir), Path(tempfile.mkdtemp()), torch.float32),
        "checkpoint": LoadedEncoder(from_checkpoint.model, from_checkpoint.tokenizer, None, "checkpoint"),
    }
    for name, encoder in encoders.items():
        gpu = Classifier(encoder, "cuda")
        gpu.capture_graphs(4096)
        worst, same_labels, n = 0.0, 0, 0
        for labels in LABELS:
            for multi in (False, True):
                items = [ClassifyItem(t, labels, multi, 12) for t in TEXTS]
                for a, b in zip(cpu.run(items), gpu.run(items), strict=True):
                    n += 1
                    same_labels += a.label == b.label and a.labels == b.labels
                    worst = max(worst, *(abs(x - y) for (_, x), (_, y) in zip(a.scores, b.scores, strict=True)))
        result[name] = {"results": n, "same_labels": same_labels, "max_score_diff": worst}
    print(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_classify_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
