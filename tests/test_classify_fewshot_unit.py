"""Few-shot labels, out-of-scope thresholds and trained heads (issue 13): the math on made-up embeddings,
the head's file format and training, the request schema, and label objects crossing processes."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from engine import protocol
from engine.classifier import (
    BACKGROUND,
    NONE_LABEL,
    ClassifyItem,
    ClassResult,
    EncoderFrontend,
    LabelSpec,
    label_similarities,
    multi_result,
    similarity_results,
    single_result,
)
from models.classifier_head import ClassifierHead, is_head_dir
from models.sources import resolve_spec
from models.train_classifier import expected_calibration_error, fit_temperature, train
from server.routes.common import encoder_inputs
from server.schemas import CLS_MAX_LABEL_TEXTS, ClassifyRequest
from server.services.tokenizing import OFF_LOOP_CHARS

pytestmark = pytest.mark.unit


def unit(*xs: float) -> torch.Tensor:
    return F.normalize(torch.tensor(xs, dtype=torch.float32), dim=-1)


def test_label_texts_examples_and_description_else_name() -> None:
    assert LabelSpec("billing").texts == ("billing",)
    assert LabelSpec("billing", "money questions").texts == ("money questions",)
    assert LabelSpec("billing", "money", ("charged twice", "invoice")).texts == ("charged twice", "invoice", "money")
    assert LabelSpec("billing", None, ["x"]).examples == ("x",)  # lists become tuples: hashable cache keys
    assert ClassifyItem("t", ("a", "b")).labels == (LabelSpec("a"), LabelSpec("b"))


def test_prototype_knn_and_mix() -> None:
    emb = torch.stack([unit(1, 0, 0)])
    examples = torch.stack([unit(1, 0, 0), unit(0, 1, 0)])  # one example on the input, one orthogonal
    proto = float(label_similarities(emb, [examples], "prototype")[0, 0])
    knn = float(label_similarities(emb, [examples], "knn")[0, 0])
    mix = float(label_similarities(emb, [examples], "mix")[0, 0])
    assert proto == pytest.approx(1 / math.sqrt(2), abs=1e-6)  # cosine to the normalized mean
    assert knn == pytest.approx(1.0, abs=1e-6)  # the best example
    assert mix == pytest.approx((proto + knn) / 2, abs=1e-6)
    one = label_similarities(emb, [unit(0.6, 0.8, 0).unsqueeze(0)], "knn")  # a single vector: zero-shot cosine
    assert float(one[0, 0]) == pytest.approx(0.6, abs=1e-6)


def test_centering_on_the_background_removes_what_all_texts_share() -> None:
    shared = torch.tensor([0.0, 0.0, 1.0])  # a direction every text has (what the background mean estimates)
    emb = F.normalize(torch.stack([torch.tensor([0.3, 0.1, 1.0])]), dim=-1)
    near, shared_only = unit(1, 0, 1), unit(0, 0.2, 1)  # the input's own direction; mostly the shared one
    labels = [near.unsqueeze(0), shared_only.unsqueeze(0)]
    plain = label_similarities(emb, labels, "prototype")
    centered = label_similarities(emb, labels, "prototype", center=shared)
    # the label near only through the shared direction wins without centering and loses with it
    assert int(plain.argmax()) == 1 and int(centered.argmax()) == 0
    assert float(centered[0, 1]) < 0.5 < float(plain[0, 1])
    want = F.normalize(emb[0] - shared, dim=0) @ F.normalize(labels[1][0] - shared, dim=0)
    assert float(centered[0, 1]) == pytest.approx(float(want), abs=1e-6)
    # few-shot: the prototype is the mean of the centered, re-normalized examples
    examples = torch.stack([unit(1, 0, 1), unit(0, 1, 1)])
    proto = F.normalize(F.normalize(examples - shared, dim=-1).mean(0), dim=0)
    got = label_similarities(emb, [examples], "prototype", center=shared)
    assert float(got[0, 0]) == pytest.approx(float(F.normalize(emb[0] - shared, dim=0) @ proto), abs=1e-6)
    assert label_similarities(emb, labels, "prototype", center=None).equal(plain)


def test_the_background_is_the_calibration_texts_prose() -> None:
    """engine/background.txt is what it was chosen as on the train split (data/README.md): kept in step."""
    lines = (Path(__file__).resolve().parent.parent / "data" / "calibration.txt").read_text().splitlines()
    prose = [ln.strip() for ln in lines if len(ln.split()) >= 4 and not ln.startswith(("User:", "Assistant:"))]
    assert tuple(prose) == BACKGROUND and len(BACKGROUND) >= 50


def test_threshold_adds_none_that_wins_exactly_below_it() -> None:
    labels = (LabelSpec("a"), LabelSpec("b"))
    sims = torch.tensor([[0.50, 0.20], [0.25, 0.10]])
    plain = similarity_results(sims, labels, multi_label=False, threshold=None)
    assert [r.label for r in plain] == ["a", "a"]
    assert all(NONE_LABEL not in dict(r.scores) for r in plain)
    gated = similarity_results(sims, labels, multi_label=False, threshold=0.3)
    assert [r.label for r in gated] == ["a", NONE_LABEL]
    for r in gated:
        assert sum(s for _, s in r.scores) == pytest.approx(1.0, abs=1e-6)
        assert NONE_LABEL in dict(r.scores)
    # none's logit is threshold / temperature: softmax over [0.25, 0.10, 0.30] / 0.05
    want = torch.softmax(torch.tensor([0.25, 0.10, 0.30]) / 0.05, dim=0)
    assert dict(gated[1].scores)[NONE_LABEL] == pytest.approx(float(want[2]), abs=1e-6)


def test_multi_label_uses_each_labels_own_threshold() -> None:
    labels = (LabelSpec("a", threshold=0.6), LabelSpec("b"), LabelSpec("c", threshold=0.1))
    sims = torch.tensor([[0.5, 0.45, 0.2], [0.1, 0.1, 0.05]])
    first, second = similarity_results(sims, labels, multi_label=True, threshold=0.4)
    # a: 0.5 < its own 0.6; b: 0.45 >= the request's 0.4; c: 0.2 >= its own 0.1 (the furthest above: first)
    assert first.labels == ["c", "b"] and first.label == "c"
    assert dict(first.scores)["a"] < 0.5 < dict(first.scores)["b"]
    assert second.labels == [] and second.label == NONE_LABEL
    assert second.score == pytest.approx(1 - second.scores[0][1])
    # without a request threshold the default bar applies to labels without their own
    (res,) = similarity_results(torch.tensor([[0.3, 0.36, 0.0]]), labels, True, None, multi_label_threshold=0.35)
    assert res.labels == ["b"]


def test_single_and_multi_results_for_heads() -> None:
    names = ["a", "b", "c"]
    assert single_result(names, [0.5, 0.3, 0.2], None).label == "a"
    low = single_result(names, [0.4, 0.35, 0.25], 0.45)
    assert (low.label, low.score) == (NONE_LABEL, pytest.approx(0.6))
    assert [n for n, _ in low.scores] == names  # the scores stay the head's
    assert single_result([*names, NONE_LABEL], [0.1, 0.1, 0.1, 0.7], 0.5).label == NONE_LABEL
    multi = multi_result(names, [0.5, 0.3, 0.2], [0.6, 0.25, 0.1])
    assert multi.labels == ["b", "c"] and multi.label == "b" and multi.score == pytest.approx(0.3)


def clusters(n_per: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Made-up embeddings: three intents around their own directions, out-of-scope ones spread around."""
    centres = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(100 + seed)
    rows, labels = [], []
    for j, name in enumerate(["alpha", "beta", "gamma"]):
        rows.append(F.normalize(centres[j] + 0.35 * torch.randn(n_per, 16, generator=g), dim=-1))
        labels += [name] * n_per
    rows.append(F.normalize(torch.randn(n_per, 16, generator=g), dim=-1))
    labels += [NONE_LABEL] * n_per
    return torch.cat(rows), labels


def test_training_reports_cross_validation_and_calibrates(tmp_path: Path) -> None:
    emb, labels = clusters(30)
    fit = train([f"t{i}" for i in range(len(labels))], labels, emb, folds=5)
    report = fit.report
    assert report["rows"] == 120 and report["per_label"]["none"] == 30
    # regularization and class weighting are both chosen by CV: every pair's accuracy is reported
    assert set(report["cv_accuracy_by_C"]) == set(report["cv_accuracy_by_C_balanced"])
    assert report["class_weight"] in (None, "balanced")
    chosen = report["cv_accuracy_by_C_balanced" if report["class_weight"] else "cv_accuracy_by_C"]
    assert report["cv_accuracy_without_threshold"] == max(
        *report["cv_accuracy_by_C"].values(), *report["cv_accuracy_by_C_balanced"].values()
    )
    assert report["cv_accuracy_without_threshold"] in chosen.values()
    assert report["cv_accuracy"] > 0.8
    assert report["cv_ece_calibrated"] <= report["cv_ece_raw"] + 1e-9  # the temperature never worsens it much
    assert set(fit.head.label_thresholds) == {"alpha", "beta", "gamma"}
    assert all(0 < t < 1 for t in fit.head.label_thresholds.values())
    fit.head.save(tmp_path / "head")
    assert is_head_dir(tmp_path / "head")
    loaded = ClassifierHead.load(tmp_path / "head")
    assert loaded.labels == ["alpha", "beta", "gamma", "none"] and loaded.name == "head"
    assert loaded.report == report
    torch.testing.assert_close(loaded.probs(emb), fit.head.probs(emb))
    # The head's answers agree with the classes on held-out points from the same clusters.
    test_emb, test_labels = clusters(20, seed=1)
    names = loaded.labels
    pred = [names[i] for i in loaded.probs(test_emb).argmax(-1).tolist()]
    assert np.mean([p == g for p, g in zip(pred, test_labels, strict=True)]) > 0.8
    assert resolve_spec(str(tmp_path / "head"), "classify").kind == "head_dir"
    assert resolve_spec(str(tmp_path / "head"), "classify").name == "head"


def test_temperature_and_ece() -> None:
    gold = np.array([0, 1] * 50)
    logits = np.zeros((100, 2))
    logits[np.arange(100), gold] = 10.0  # right and overconfident half of the time...
    logits[:20] = logits[:20][:, ::-1]  # ...and confidently wrong on a fifth
    t = fit_temperature(logits, gold)
    assert t > 1  # overconfidence is softened
    probs = np.exp(logits / t) / np.exp(logits / t).sum(1, keepdims=True)
    assert expected_calibration_error(probs, gold) < expected_calibration_error(np.exp(logits) / 2, gold) + 1


def test_head_validates_its_shapes() -> None:
    with pytest.raises(ValueError, match="labels"):
        ClassifierHead(["a", "b"], torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="temperature"):
        ClassifierHead(["a", "b"], torch.zeros(2, 4), torch.zeros(2), temperature=0)


def test_label_objects_travel_to_an_engine_core() -> None:
    item = ClassifyItem(
        "where is my parcel",
        (LabelSpec("shipping", "delivery questions", ("tracking?", "late parcel"), 0.4), "billing"),
        multi_label=True,
        n_tokens=7,
        threshold=0.3,
        ids=(101, 2073, 2003, 2026, 2112, 102, 0),
    )
    frame = protocol.decode_to_core(protocol.encode(protocol.Commands([protocol.ClassifyRequest(3, [item])])))
    assert isinstance(frame, protocol.Commands) and frame.items == [protocol.ClassifyRequest(3, [item])]
    assert isinstance(frame.items[0], protocol.ClassifyRequest) and frame.items[0].items[0].ids == item.ids
    back = protocol.unpack_result(protocol.pack_result(ClassResult("shipping", 0.7, [("shipping", 0.7)], ["shipping"])))
    assert back == ClassResult("shipping", 0.7, [("shipping", 0.7)], ["shipping"])


def test_schema_accepts_label_objects_and_bounds_them() -> None:
    body = ClassifyRequest.model_validate(
        {
            "inputs": "I was charged twice",
            "labels": ["shipping", {"name": "billing", "description": "money", "examples": ["double charge"]}],
            "threshold": 0.3,
        }
    )
    assert body.label_texts == ["shipping", "double charge", "money"]
    bad = [
        {"labels": [{"name": "a"}, "a"]},  # names must be unique across both forms
        {"labels": ["none", "b"], "threshold": 0.2},  # the out-of-scope answer is reserved
        {"labels": ["none", "b"], "multi_label": True},
        {"labels": [{"name": "a", "examples": [" "]}]},
        {"labels": [{"name": "a", "examples": ["x"] * 33}]},
        {"labels": [{"name": f"l{i}", "examples": ["x"] * 32} for i in range(CLS_MAX_LABEL_TEXTS // 32 + 1)]},
        {"labels": [{"name": "a", "colour": "red"}]},
        {"labels": ["a"], "threshold": 1.5},
    ]
    for extra in bad:
        with pytest.raises(pydantic.ValidationError):
            ClassifyRequest.model_validate({"inputs": "x", **extra})
    assert ClassifyRequest.model_validate({"inputs": "x", "labels": ["none", "b"]}).labels == ["none", "b"]


class _ThreadRecordingTokenizer:
    """Counts words; records which thread tokenized (a deep copy shares the record)."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def __deepcopy__(self, memo: dict) -> _ThreadRecordingTokenizer:
        return _ThreadRecordingTokenizer(self.seen)

    def __call__(self, texts: list[str], **_: object) -> dict[str, list[list[int]]]:
        self.seen.append(threading.current_thread().name)
        return {"input_ids": [[0] * len(t.split()) for t in texts]}


async def test_long_classification_inputs_are_counted_off_the_event_loop() -> None:
    seen: list[str] = []
    frontend = EncoderFrontend(_ThreadRecordingTokenizer(seen), False, [], 512, 8)
    runtime = SimpleNamespace(
        settings=SimpleNamespace(cls_max_inputs=16, cls_max_input_tokens=512), classifier=frontend
    )
    short, _ = await encoder_inputs(runtime, ["a short one"], "inputs", single=True)  # type: ignore[arg-type]
    long_text = "word " * (OFF_LOOP_CHARS // 5 + 1)  # at least OFF_LOOP_CHARS characters
    counts, label_counts = await encoder_inputs(runtime, [long_text], "inputs", single=True, labels=["x y"])  # type: ignore[arg-type]
    assert [len(r) for r in short] == [3] and [len(r) for r in counts] == [OFF_LOOP_CHARS // 5 + 1]
    assert label_counts == [2]
    assert seen[0] == threading.current_thread().name
    assert seen[1].startswith("tokenize-encoder")
