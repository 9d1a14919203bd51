"""Pooled features (last and early layer), the out-of-scope gate of label scores and heads over the features
(issue 13): the math on made-up tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.classifier import (
    NONE_LABEL,
    LabelSpec,
    label_prototypes,
    label_scores,
    label_similarities,
    prototype_scores,
    similarity_results,
)
from models.classifier_head import ClassifierHead, early_layer, mean_pool, pooled_features

pytestmark = pytest.mark.unit


def test_pooled_features_are_the_last_and_the_early_layer_each_unit_norm() -> None:
    assert [early_layer(n) for n in (1, 3, 6, 12)] == [1, 2, 4, 8]
    g = torch.Generator().manual_seed(0)
    hidden_states = [torch.randn(2, 5, 8, generator=g) for _ in range(7)]  # embeddings + 6 layers
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = pooled_features(hidden_states, mask)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got[:, :8], mean_pool(hidden_states[6], mask))
    torch.testing.assert_close(got[:, 8:], mean_pool(hidden_states[4], mask))
    torch.testing.assert_close(got[:, :8].norm(dim=-1), torch.ones(2))
    # padding does not count: the first row is the mean of its three real tokens
    want = F.normalize(hidden_states[6][0, :3].mean(0), dim=0)
    torch.testing.assert_close(got[0, :8], want)


def test_label_scores_rank_by_the_embedding_and_gate_on_both_layers() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.cat([F.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(2)], dim=-1)
    labels = [torch.cat([F.normalize(torch.randn(k, 4, generator=g), dim=-1) for _ in range(2)], -1) for k in (1, 3)]
    center = torch.randn(8, generator=g) * 0.1
    for method in ("prototype", "knn", "mix"):
        rank, gate = label_scores(feats, labels, method, center)
        last = label_similarities(feats[:, :4], [v[:, :4] for v in labels], method, center[:4])
        early = label_similarities(feats[:, 4:], [v[:, 4:] for v in labels], method, center[4:])
        torch.testing.assert_close(rank, last)
        torch.testing.assert_close(gate, (last + early) / 2)


def test_cached_prototypes_score_as_the_prototype_method() -> None:
    """What Classifier.run keeps per label set (label_prototypes) gives label_scores' prototype scores."""
    g = torch.Generator().manual_seed(2)
    feats = torch.cat([F.normalize(torch.randn(4, 6, generator=g), dim=-1) for _ in range(2)], dim=-1)
    sets = [torch.cat([F.normalize(torch.randn(k, 6, generator=g), dim=-1) for _ in range(2)], -1) for k in (1, 2, 6)]
    for center in (None, torch.randn(12, generator=g) * 0.2):
        protos = label_prototypes(sets, center)
        assert protos.shape == (3, 12)
        want = label_scores(feats, sets, "prototype", center)
        for got, expected in zip(prototype_scores(feats, protos, center), want, strict=True):
            torch.testing.assert_close(got, expected)


def test_the_gate_decides_out_of_scope_and_the_ranking_the_label() -> None:
    labels = (LabelSpec("a"), LabelSpec("b"))
    sims = torch.tensor([[0.50, 0.20], [0.40, 0.45]])
    gate = torch.tensor([[0.25, 0.60], [0.10, 0.35]])  # row 0: a ranks first, its gate is under 0.3
    first, second = similarity_results(sims, labels, multi_label=False, threshold=0.3, gate=gate)
    assert first.label == NONE_LABEL  # b's gate (0.60) does not count: b is not the best-ranked label
    assert second.label == "b"  # b ranks first and its gate 0.35 reaches 0.3
    for r in (first, second):
        assert sum(s for _, s in r.scores) == pytest.approx(1.0, abs=1e-6)
    # none's logit is (best + threshold - gate of best) / temperature: row 0 over [0.50, 0.20, 0.55] / 0.05
    want = torch.softmax(torch.tensor([0.50, 0.20, 0.55]) / 0.05, dim=0)
    assert dict(first.scores)[NONE_LABEL] == pytest.approx(float(want[2]), abs=1e-6)
    # a gate equal to the ranking is the plain threshold: the same scores as without a gate
    same = similarity_results(sims, labels, multi_label=False, threshold=0.3, gate=sims)
    plain = similarity_results(sims, labels, multi_label=False, threshold=0.3)
    for a, b in zip(same, plain, strict=True):
        assert a.label == b.label
        assert [n for n, _ in a.scores] == [n for n, _ in b.scores]
        assert [s for _, s in a.scores] == pytest.approx([s for _, s in b.scores], abs=1e-6)
    # multi-label keeps scoring each label on its ranking cosine against its bar
    (multi,) = similarity_results(sims[:1], labels, multi_label=True, threshold=0.3, gate=gate[:1])
    assert multi.labels == ["a"]


def test_a_head_reads_the_features_or_an_older_heads_embedding_half() -> None:
    feats = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    both = ClassifierHead(["x", "y"], torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 5.0, 0.0]]), torch.zeros(2))
    assert both.probs(feats).argmax(-1).tolist() == [0, 1]  # decided by the early half
    older = ClassifierHead(["x", "y"], torch.tensor([[0.0, 5.0], [5.0, 0.0]]), torch.zeros(2))
    assert older.probs(feats).argmax(-1).tolist() == [1, 0]  # the embedding half only
    torch.testing.assert_close(older.probs(feats), older.probs(feats[:, :2]))
