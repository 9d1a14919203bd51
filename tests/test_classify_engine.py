"""Classification engine: the real embedded MiniLM through Classifier (batcher semantics: test_batcher.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine.batcher import DynamicBatcher
from engine.classifier import (
    Classifier,
    ClassifierInputError,
    ClassifyItem,
    ClassResult,
    NoClassificationHead,
)
from engine.encoder_graphs import pad_batch, seq_buckets
from models.loader import load_encoder
from tests.conftest import write_head_model

pytestmark = pytest.mark.integration

CS_LABELS = ["billing", "shipping", "technical support"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def clf(cache_dir: Path) -> Classifier:
    return Classifier(load_encoder("default", cache_dir, torch.float32), "cpu")


def _assert_results_close(a: ClassResult, b: ClassResult, tol: float = 1e-5) -> None:
    assert [name for name, _ in a.scores] == [name for name, _ in b.scores]
    for (_, sa), (_, sb) in zip(a.scores, b.scores, strict=True):
        assert abs(sa - sb) <= tol
    assert a.label == b.label


# ---------------------------------------------------------------------------- Classifier


def test_embeddings_unit_norm_and_dim(clf: Classifier) -> None:
    texts = ["hello", "The quick brown fox jumps over the lazy dog.", "Where is my parcel?"]
    emb = clf.embed(texts)
    assert emb.shape == (3, 384)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    # Semantics sanity: a paraphrase is closer than an unrelated sentence.
    a, b, c = clf.embed(["Where is my package?", "My parcel has not been delivered yet", "I love pizza"])
    assert float(a @ b) > float(a @ c) + 0.2
    assert clf.embed([]).shape == (0, 384)


def test_count_tokens_includes_special_tokens_and_does_not_truncate(clf: Classifier) -> None:
    counts = clf.count_tokens(["hello world", "word " * 1000, ""])
    assert counts[0] == 4  # [CLS] hello world [SEP]
    assert counts[1] == 1002
    assert counts[2] == 2
    assert clf.count_tokens([]) == []
    assert clf.max_length == 512


def test_a_batch_from_the_api_servers_token_ids_is_the_tokenized_batch(clf: Classifier) -> None:
    texts = ["hello world", "Where is my parcel? " * 7, "", "naïve café, 10% off!", "word " * 600]
    ids = clf.token_ids(texts)
    fits = texts[:4]
    tokenized, padded = clf._tokenize(fits), clf._padded(ids[:4])
    assert list(padded) == list(tokenized)
    for name in tokenized:
        assert torch.equal(padded[name], tokenized[name]), name
    plain = [ClassifyItem(t, tuple(CS_LABELS)) for t in texts]
    carried = [ClassifyItem(t, tuple(CS_LABELS), ids=tuple(row)) for t, row in zip(texts, ids, strict=True)]
    assert clf.run(carried[:4]) == clf.run(plain[:4])  # the same forward inputs: identical results
    assert clf.run(carried) == clf.run(plain)  # one longer than the model takes: tokenized (truncated) again


def test_long_input_is_truncated_for_embedding(clf: Classifier) -> None:
    emb = clf.embed(["word " * 2000])
    assert emb.shape == (1, 384)


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("I was charged twice for my order", CS_LABELS, "billing"),
        ("Where is my package? It still hasn't been delivered.", CS_LABELS, "shipping"),
        ("There is an unexpected fee on my invoice", CS_LABELS, "billing"),
        (
            "The app crashes every time I open it",
            ["billing and payments", "shipping and delivery", "technical problem with the app or website"],
            "technical problem with the app or website",
        ),
    ],
)
def test_zero_shot_picks_sensible_label(clf: Classifier, text: str, labels: list[str], expected: str) -> None:
    (res,) = clf.classify([text], labels)
    assert res.label == expected
    assert res.scores[0][0] == expected
    assert sorted(name for name, _ in res.scores) == sorted(labels)
    assert abs(sum(s for _, s in res.scores) - 1.0) < 1e-5
    assert [s for _, s in res.scores] == sorted((s for _, s in res.scores), reverse=True)
    assert res.score == res.scores[0][1] > 0.5


def test_zero_shot_multi_label_scores_independently(clf: Classifier) -> None:
    (res,) = clf.classify(
        ["My package arrived damaged and I want a refund"],
        ["shipping", "refund request", "technical support"],
        multi_label=True,
    )
    scores = dict(res.scores)
    assert scores["refund request"] > 0.5
    assert scores["shipping"] > 0.5
    assert scores["technical support"] < 0.1
    assert res.label == "refund request"


def test_label_embeddings_are_cached(clf: Classifier, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = ["cache probe label one", "cache probe label two"]
    clf.classify(["first call"], labels)
    calls: list[list[str]] = []
    real_features = clf.features

    def counting_features(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return real_features(texts)

    monkeypatch.setattr(clf, "features", counting_features)
    clf.classify(["second call", "third"], labels)
    assert calls == []  # labels came from the cache; the texts go through _forward directly
    clf.classify(["x"], [*labels, "cache probe label three"])
    assert calls == [["cache probe label three"]]


def test_batched_equals_alone(clf: Classifier) -> None:
    items = [
        ClassifyItem("hi", tuple(CS_LABELS)),
        ClassifyItem("I was charged twice for my order and nobody answers my emails. " * 6, tuple(CS_LABELS)),
        ClassifyItem("Where is my package?", ("shipping", "refund request", "praise"), multi_label=True),
        ClassifyItem("The app crashes on startup since the last update", ("bug", "feature request")),
        ClassifyItem("ok", ("shipping", "refund request", "praise"), multi_label=True),
        ClassifyItem("Please cancel my subscription " * 20, ("cancellation", "billing")),
        ClassifyItem("Thanks a lot!", tuple(CS_LABELS), multi_label=True),
    ]
    batched = clf.run(items)
    for item, got in zip(items, batched, strict=True):
        (alone,) = clf.run([item])
        assert isinstance(got, ClassResult) and isinstance(alone, ClassResult)
        _assert_results_close(got, alone)
    texts = [it.text for it in items]
    torch.testing.assert_close(clf.embed(texts), torch.cat([clf.embed([t]) for t in texts]), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_bucket_padding_leaves_real_rows_unchanged(clf: Classifier) -> None:
    """What a CUDA-graph bucket feeds the encoder (rows and columns of padding, padding rows attending
    to one token) gives the real rows the embeddings of the exact batch, and no NaN anywhere."""
    texts = ["my card was charged twice", "where is my parcel?", "reset password"]
    inputs = clf._tokenize(texts)
    exact, _ = clf._encode(inputs)
    padded, _ = clf._encode(pad_batch(inputs, 8, seq_buckets(clf.max_length)[1]))
    assert padded.shape[0] == 8 and torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:3], exact, atol=1e-5, rtol=1e-5)


def test_no_head_and_no_labels_raises(clf: Classifier) -> None:
    assert not clf.has_head
    with pytest.raises(NoClassificationHead) as info:
        clf.classify(["hello"])
    assert info.value.field == "labels"
    assert isinstance(info.value, ClassifierInputError)
    with pytest.raises(NoClassificationHead):
        clf.check(ClassifyItem("hello"))
    with pytest.raises(ClassifierInputError) as empty:
        clf.classify(["hello"], [])
    assert empty.value.field == "labels"
    # Inside a batch only the offending item fails.
    out = clf.run([ClassifyItem("I was charged twice", tuple(CS_LABELS)), ClassifyItem("no labels")])
    assert isinstance(out[0], ClassResult) and out[0].label == "billing"
    assert isinstance(out[1], NoClassificationHead)


@pytest.fixture(scope="module")
def head_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_head")
    write_head_model(out, ["negative", "neutral", "positive"])
    return out


def test_head_model_uses_id2label(head_model_dir: Path, cache_dir: Path) -> None:
    enc = load_encoder(str(head_model_dir), cache_dir, torch.float32)
    assert enc.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    head = Classifier(enc, "cpu")
    assert head.has_head
    assert head.head_labels == ["negative", "neutral", "positive"]
    texts = ["great product", "terrible service, never again", "meh"]
    results = head.classify(texts)
    for res in results:
        assert {name for name, _ in res.scores} == {"negative", "neutral", "positive"}
        assert abs(sum(s for _, s in res.scores) - 1.0) < 1e-5
        assert res.label == res.scores[0][0]
    # Same numbers as the model's own logits.
    batch = enc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        probs = torch.softmax(enc.model(**batch).logits, dim=-1)
    for res, row in zip(results, probs, strict=True):
        got = dict(res.scores)
        for i, name in enumerate(["negative", "neutral", "positive"]):
            assert abs(got[name] - float(row[i])) < 1e-5
    multi = head.classify(texts, multi_label=True)
    assert all(0.0 < s < 1.0 for res in multi for _, s in res.scores)
    # A batch mixing head items and zero-shot items (one forward) equals running each alone.
    items = [
        ClassifyItem("great product"),
        ClassifyItem("where is my parcel " * 10, ("shipping", "billing")),
        ClassifyItem("terrible service, never again", multi_label=True),
    ]
    for item, got in zip(items, head.run(items), strict=True):
        (alone,) = head.run([item])
        assert isinstance(got, ClassResult) and isinstance(alone, ClassResult)
        _assert_results_close(got, alone)


# ---------------------------------------------------------------------------- with the batcher


def test_batcher_with_real_classifier(clf: Classifier) -> None:
    texts = [
        "I was charged twice for my order",
        "Where is my package? It still hasn't been delivered.",
        "There is an unexpected fee on my invoice",
        "When will my order ship?",
    ]
    expected = clf.classify(texts, CS_LABELS)
    counts = clf.count_tokens(texts)

    async def main() -> list[ClassResult]:
        b: DynamicBatcher[ClassifyItem, ClassResult] = DynamicBatcher(
            clf.run, max_batch_size=32, max_batch_tokens=8192, max_wait_ms=5, cost=lambda it: it.n_tokens
        )
        items = [ClassifyItem(t, tuple(CS_LABELS), n_tokens=n) for t, n in zip(texts, counts, strict=True)]
        res = await b.submit_many(items)
        with pytest.raises(NoClassificationHead):
            await b.submit(ClassifyItem("no labels"))
        await b.stop()
        return res

    got = asyncio.run(main())
    for a, e in zip(got, expected, strict=True):
        _assert_results_close(a, e)
    assert [r.label for r in got] == ["billing", "shipping", "billing", "shipping"]
