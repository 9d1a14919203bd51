"""Presence/frequency penalties as logit adjustments from the sequence's own output tokens."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import apply_penalties, sample
from engine.sequence import SamplingParams, Sequence

pytestmark = pytest.mark.unit


def seq(output: list[int], **params: float) -> Sequence:
    s = Sequence(prompt_ids=[7, 7, 7], params=SamplingParams(**params))  # prompt tokens are never penalized
    s.output_ids = list(output)
    return s


def test_penalties_follow_openai_formula() -> None:
    logits = torch.zeros(3, 8)
    seqs = [
        seq([1, 1, 2], frequency_penalty=0.5),
        seq([1, 1, 2], presence_penalty=0.25),
        seq([1, 1, 2]),  # no penalty: row untouched
    ]
    out = apply_penalties(logits, seqs)
    assert out[0].tolist() == [0, -1.0, -0.5, 0, 0, 0, 0, 0]
    assert out[1].tolist() == [0, -0.25, -0.25, 0, 0, 0, 0, 0]
    assert out[2].tolist() == [0.0] * 8
    assert logits.abs().sum() == 0  # the caller's tensor is not modified


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]])
    assert sample(logits, [seq([1], frequency_penalty=0.0)]) == [1]
    assert sample(logits, [seq([1], frequency_penalty=1.0)]) == [2]
    assert sample(logits, [seq([2, 2], presence_penalty=-1.0)]) == [2]  # negative values encourage repeats


def test_precomputed_argmax_is_used_only_without_penalties() -> None:
    """The decode graph hands its argmax in; penalties must still win over it."""
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]])
    graph_argmax = torch.tensor([1])
    assert sample(logits, [seq([1])], graph_argmax) == [1]
    assert sample(logits, [seq([1], frequency_penalty=1.0)], graph_argmax) == [2]
