"""Few-shot labels, out-of-scope and trained heads with the real embedded MiniLM (issue 13): in the
classifier, from a trained head's directory, and through /classify on the ASGI app."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from engine.classifier import BACKGROUND, NONE_LABEL, Classifier, LabelSpec, label_similarities
from models.loader import load_encoder
from models.train_classifier import embed_texts, read_rows, train
from server.app import create_app
from server.config import Settings
from server.runtime import Runtime
from tests.conftest import TEST_SETTINGS

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent.parent / "data"
BILLING = LabelSpec("billing", "payments and charges", ("I was charged twice", "send me my invoice", "card declined"))
SHIPPING = LabelSpec("shipping", None, ("where is my parcel", "tracking has not moved", "deliver on Saturday?"))


@pytest.fixture(scope="module")
def clf(cache_dir: Path) -> Classifier:
    return Classifier(load_encoder("default", cache_dir, torch.float32), "cpu")


def test_training_embeddings_are_the_served_ones(clf: Classifier, cache_dir: Path) -> None:
    texts = ["Where is my order?", "I want a refund for the double charge " * 5, "hi"]
    offline = embed_texts(load_encoder("default", cache_dir, torch.float32), texts)
    torch.testing.assert_close(offline, clf.features(texts).cpu(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(offline[:, : clf.embedding_dim], clf.embed(texts).cpu(), atol=1e-5, rtol=1e-4)


def test_few_shot_labels_and_out_of_scope(clf: Classifier) -> None:
    got = clf.classify(["my card got billed two times", "the parcel is late"], [BILLING, SHIPPING])
    assert [r.label for r in got] == ["billing", "shipping"]
    # mixed with a plain zero-shot label in one request
    (mixed,) = clf.classify(["I want to return these shoes"], [BILLING, SHIPPING, "returning an item"])
    assert mixed.label == "returning an item"
    (oos,) = clf.classify(["Who painted the Mona Lisa?"], [BILLING, SHIPPING], threshold=0.35)
    assert oos.label == NONE_LABEL and dict(oos.scores)[NONE_LABEL] == oos.score
    (multi,) = clf.classify(["charged twice and the parcel never came"], [BILLING, SHIPPING], multi_label=True)
    assert set(multi.labels or ()) == {"billing", "shipping"}


def test_example_embeddings_are_computed_once(clf: Classifier, monkeypatch: pytest.MonkeyPatch) -> None:
    label = LabelSpec("probe", "a probe label", ("probe example one", "probe example two"))
    clf.classify(["first"], [label, BILLING])
    calls: list[list[str]] = []
    real = clf.features
    monkeypatch.setattr(clf, "features", lambda texts: calls.append(list(texts)) or real(texts))
    clf.classify(["second", "third"], [label, BILLING])
    assert calls == []
    clf.classify(["x"], [LabelSpec("probe", "a probe label", ("probe example one", "probe example three"))])
    assert calls == [["probe example three"]]


def test_label_scores_are_centered_on_the_background(clf: Classifier, cache_dir: Path) -> None:
    center = clf.center()
    assert center is not None and clf.center() is center  # embedded once
    torch.testing.assert_close(center, clf.features(list(BACKGROUND)).mean(0), atol=1e-5, rtol=1e-4)
    texts, labels = ["my card got billed two times"], [BILLING, SHIPPING]
    plain = Classifier(load_encoder("default", cache_dir, torch.float32), "cpu", background=())
    assert plain.center() is None
    emb, sets = clf.embed(texts), [clf.embed(list(lab.texts)) for lab in labels]
    center = center[: clf.embedding_dim]  # the sentence embedding's half, which ranks labels
    torch.testing.assert_close(
        label_similarities(emb, sets, clf.few_shot, center),
        torch.tensor(
            [
                [
                    float(
                        F.normalize(emb[0] - center, dim=0)
                        @ F.normalize(F.normalize(s - center, dim=-1).mean(0), dim=0)
                    )
                    for s in sets
                ]
            ]
        ),
    )
    centered, raw = clf.classify(texts, labels)[0], plain.classify(texts, labels)[0]
    assert centered.label == raw.label == "billing" and centered.scores != raw.scores


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A head trained on the project's train split, as `python -m models.train_classifier` writes it."""
    texts, labels = read_rows([DATA / "intents.jsonl", DATA / "intents_oos.jsonl"])
    emb = embed_texts(load_encoder("default", cache_dir, torch.float32), texts)
    out = tmp_path_factory.mktemp("head")
    train(texts, labels, emb).head.save(out)
    return out


def test_trained_head_serves_without_labels(head_dir: Path, cache_dir: Path) -> None:
    meta = json.loads((head_dir / "classifier_head.json").read_text())
    assert meta["report"]["cv_accuracy"] > 0.8 and meta["labels"][-1] == "technical_support"
    head = Classifier(load_encoder(str(head_dir), cache_dir, torch.float32), "cpu")
    assert head.has_head and head.head_labels == meta["labels"]
    msgs = ["I was charged twice this month", "my tracking number does not work", "What's the capital of Peru?"]
    got = head.classify(msgs)
    assert [r.label for r in got] == ["billing", "shipping", NONE_LABEL]
    for r in got:
        assert sum(s for _, s in r.scores) == pytest.approx(1.0, abs=1e-5)
    (multi,) = head.classify(msgs[:1], multi_label=True)
    assert multi.labels and multi.labels[0] == "billing"
    (strict,) = head.classify(msgs[:1], threshold=0.999999)  # a request's threshold overrides the head's
    assert strict.label == NONE_LABEL


async def test_classify_route_with_label_objects_and_head(head_dir: Path, cache_dir: Path) -> None:
    settings = Settings(cache_dir=cache_dir, **TEST_SETTINGS, enable_generate=False, cls_model=str(head_dir))
    runtime = Runtime.load(settings)
    await runtime.start()
    app = create_app(settings, runtime)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                r = await client.post("/classify", json={"inputs": ["I was charged twice", "Tell me a joke"]})
                assert r.status_code == 200, r.text
                assert [x["label"] for x in r.json()["results"]] == ["billing", "none"]
                assert "labels" not in r.json()["results"][0]  # only multi_label answers carry it
                body = {
                    "inputs": "my parcel never arrived",
                    "labels": [
                        {"name": "billing", "examples": ["I was charged twice"], "description": "payments"},
                        {"name": "shipping", "examples": ["where is my order?", "tracking is stuck"]},
                    ],
                    "threshold": 0.3,
                }
                r = await client.post("/classify", json=body)
                assert r.status_code == 200, r.text
                result = r.json()["results"][0]
                assert result["label"] == "shipping" and {s["label"] for s in result["scores"]} == {
                    "billing",
                    "shipping",
                    "none",
                }
                r = await client.post("/classify", json={**body, "multi_label": True})
                assert r.json()["results"][0]["labels"] == ["shipping"]
                long_example = "word " * 80  # over the label token limit: named down to the example
                bad = {"inputs": "x", "labels": [{"name": "a", "examples": ["ok", long_example]}]}
                r = await client.post("/classify", json=bad)
                assert r.status_code == 400 and r.json()["error"]["field"] == "labels.0.examples.1"
                info = (await client.get("/info")).json()
                (model,) = [m["model"] for m in info["models"] if m["task"] == "classify"]
                assert model.startswith("embedded HF model dir all-MiniLM-L6-v2") and "classifier head dir" in model
    finally:
        await runtime.stop()
