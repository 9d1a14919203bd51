"""Few-shot label objects and a trained head through the engine-core + API-server layout (issue 13): the
label objects travel in the ClassifyRequest frames, the head is loaded in the engine core."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from models.loader import load_encoder
from models.train_classifier import embed_texts, read_rows, train
from tests.conftest import LAYOUTS, server_process

pytestmark = pytest.mark.live

DATA = Path(__file__).resolve().parent.parent / "data"


def test_label_objects_and_trained_head_across_processes(tmp_path: Path, cache_dir: Path) -> None:
    texts, labels = read_rows([DATA / "intents.jsonl", DATA / "intents_oos.jsonl"])
    train(texts, labels, embed_texts(load_encoder("default", cache_dir, torch.float32), texts)).head.save(tmp_path)
    layout = LAYOUTS["core+2api"]
    with server_process(cache_dir, *layout, "--no-enable-generate", cls_model=tmp_path, cls_quantize="none") as (
        _,
        url,
    ):
        r = httpx.post(f"{url}/classify", json={"inputs": ["Where is my parcel?", "Tell me a joke"]}, timeout=60)
        assert r.status_code == 200, r.text
        assert [x["label"] for x in r.json()["results"]] == ["shipping", "none"]
        body = {
            "inputs": ["my card was billed twice", "what's the capital of Peru?"],
            "labels": [
                {"name": "billing", "description": "payments", "examples": ["charged twice", "invoice please"]},
                {"name": "shipping", "examples": ["where is my order?", "tracking is stuck"], "threshold": 0.4},
            ],
            "threshold": 0.3,
        }
        for _ in range(2):  # the second time from the API servers' response caches or the core's label cache
            r = httpx.post(f"{url}/classify", json=body, headers={"Connection": "close"}, timeout=60)
            assert r.status_code == 200, r.text
            assert [x["label"] for x in r.json()["results"]] == ["billing", "none"]
        r = httpx.post(f"{url}/classify", json={**body, "multi_label": True}, timeout=60)
        assert [x["labels"] for x in r.json()["results"]] == [["billing"], []]
