"""Pooled features (last and early layer), the out-of-scope gate of label scores and heads over the features
(issue 13): the math on made-up tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.classifier import (
    DESCRIPTION_WEIGHT,
    NONE_LABEL,
    RANK_EARLY_WEIGHT,
    LabelSpec,
    _rows,
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


def test_label_scores_rank_mostly_by_the_embedding_and_gate_on_both_layers() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.cat([F.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(2)], dim=-1)
    labels = [torch.cat([F.normalize(torch.randn(k, 4, generator=g), dim=-1) for _ in range(2)], -1) for k in (1, 3)]
    center = torch.randn(8, generator=g) * 0.1
    a = RANK_EARLY_WEIGHT
    assert 0 < a < 1
    for method in ("prototype", "knn", "mix"):
        rank, gate = label_scores(feats, labels, method, center)
        last = label_similarities(feats[:, :4], [v[:, :4] for v in labels], method, center[:4])
        early = label_similarities(feats[:, 4:], [v[:, 4:] for v in labels], method, center[4:])
        torch.testing.assert_close(rank, (last + a * early) / (1 + a))
        torch.testing.assert_close(gate, (last + early) / 2)
        only_last, _ = label_scores(feats, labels, method, center, early_weight=0.0)
        torch.testing.assert_close(only_last, last)


def test_the_early_layer_can_turn_a_close_ranking() -> None:
    """Two labels tied on the sentence embedding: the one nearer in the early layer ranks first; a clear lead on
    the sentence embedding is not overturned by the early layer's small share."""
    feats = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    tied = [torch.tensor([[0.6, 0.8, 1.0, 0.0]]), torch.tensor([[0.6, -0.8, 0.0, 1.0]])]
    rank, _ = label_scores(feats, tied, "prototype")
    assert rank.argmax(-1).tolist() == [0]
    # label 0: 0.6 on the last layer, 1.0 on the early one; label 1: 0.8 and 0.0
    clear = [torch.tensor([[0.6, 0.8, 1.0, 0.0]]), torch.tensor([[0.8, 0.6, 0.0, 1.0]])]
    rank, gate = label_scores(feats, clear, "prototype")
    assert rank.argmax(-1).tolist() == [1]
    assert gate.argmax(-1).tolist() == [0]  # the gate weighs both layers alike
    torch.testing.assert_close(gate, torch.tensor([[0.8, 0.4]]))


def test_the_description_weighs_in_the_prototype_as_several_examples() -> None:
    assert LabelSpec("a", "desc", ("x", "y")).weights() == (1.0, 1.0, DESCRIPTION_WEIGHT)
    assert LabelSpec("a", "desc", ("x",)).weights(2.0) == (1.0, 2.0)
    assert LabelSpec("a", None, ("x", "y")).weights() == (1.0, 1.0)
    assert LabelSpec("a", "desc").weights() == (1.0,) and LabelSpec("a").weights() == (1.0,)
    assert DESCRIPTION_WEIGHT > 1
    # two examples along x, the description along y: weight w puts the prototype at (2, w) / |(2, w)|
    ex, desc = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    vecs = torch.cat([ex, desc])
    q = torch.tensor([[0.0, 1.0]])
    for w in (1.0, 3.0):
        got = label_similarities(q, [vecs], "prototype", weights=[(1.0, 1.0, w)])
        assert float(got[0, 0]) == pytest.approx(w / (4 + w * w) ** 0.5, abs=1e-6)
    equal = label_similarities(q, [vecs], "prototype", weights=[(1.0, 1.0, 1.0)])
    torch.testing.assert_close(equal, label_similarities(q, [vecs], "prototype"))
    # nearest-example scoring ignores the weights
    knn = label_similarities(q, [vecs], "knn", weights=[(1.0, 1.0, 3.0)])
    torch.testing.assert_close(knn, label_similarities(q, [vecs], "knn"))


def test_cached_prototypes_score_as_the_prototype_method() -> None:
    """What Classifier.run keeps per label set (label_prototypes) gives label_scores' prototype scores."""
    g = torch.Generator().manual_seed(2)
    feats = torch.cat([F.normalize(torch.randn(4, 6, generator=g), dim=-1) for _ in range(2)], dim=-1)
    sets = [torch.cat([F.normalize(torch.randn(k, 6, generator=g), dim=-1) for _ in range(2)], -1) for k in (1, 2, 6)]
    for weights in (None, [(1.0,), (1.0, 3.0), (1.0, 1.0, 1.0, 1.0, 1.0, 3.0)]):
        for center in (None, torch.randn(12, generator=g) * 0.2):
            protos = label_prototypes(sets, center, weights)
            assert protos.shape == (3, 12)
            want = label_scores(feats, sets, "prototype", center, weights)
            for got, expected in zip(prototype_scores(feats, protos, center), want, strict=True):
                torch.testing.assert_close(got, expected)
    unweighted, weighted = label_prototypes(sets, None), label_prototypes(sets, None, weights)
    torch.testing.assert_close(unweighted[0], weighted[0])  # one vector: its own prototype
    assert not torch.allclose(unweighted[1:], weighted[1:])


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


def test_a_groups_consecutive_rows_index_as_a_slice_others_as_an_index_tensor() -> None:
    emb = torch.arange(12.0).reshape(6, 2)
    assert _rows([2], emb.device) == slice(2, 3) and _rows([1, 2, 3], emb.device) == slice(1, 4)
    for rows in ([1, 2, 3], [0, 2, 5], [3, 1]):
        torch.testing.assert_close(emb[_rows(rows, emb.device)], emb[torch.tensor(rows)])
