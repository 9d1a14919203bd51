"""Speculative verification through compiled decode steps (``compile_decode``: the verification width is
compiled on first use), on a tiny random Llama: the same greedy tokens as the eager engine without it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from engine import metrics
from engine.sequence import SamplingParams
from models.llama import Llama
from tests.test_speculative_unit import PROMPTS, make_engine, run

pytestmark = pytest.mark.integration  # compiles C++ (inductor) for the tiny model: tens of seconds


def test_compiled_verification_gives_the_same_tokens(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    requests = [(p, SamplingParams(max_tokens=40)) for p in PROMPTS]
    plain = run(make_engine(tiny), requests)[0]
    before = metrics.SPEC_ACCEPTED._value.get()
    compiled = make_engine(tiny, "ngram", compile_decode=True)
    assert compiled.runner.decode.compiled
    # The tiny model's lookups find one-token drafts, which the cost rule drops where every row is padded to
    # the compiled width; without that rule they are verified at that width: what this test is about.
    compiled.speculator.padded_width = 0
    assert run(compiled, requests)[0] == plain
    assert metrics.SPEC_ACCEPTED._value.get() > before
    config, state = tiny  # and a draft model drafting through its own (eager) decode graphs beside it
    drafted = make_engine(tiny, "draft", draft=Llama.from_hf(config, state), compile_decode=True)
    assert run(drafted, requests)[0] == plain
