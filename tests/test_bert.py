"""models/bert.py's plain-PyTorch encoder must compute what transformers' BertModel computes, bit for bit, on the
same weights: every layer's hidden states, with and without padding, float and int8-quantized."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from models import checkpoint
from models.bert import Bert, BertArgs
from models.quantize import install_quant_modules, quantize_modules
from tests.conftest import TINY_BERT

pytestmark = pytest.mark.unit


def pair(config: BertConfig) -> tuple[BertModel, Bert]:
    torch.manual_seed(0)
    reference = BertModel(config).eval()
    mine = Bert(config).eval()
    mine.load_state_dict(reference.state_dict(), strict=True)
    return reference, mine


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (3, 12), generator=g)
    padded = torch.ones(3, 12, dtype=torch.long)
    padded[1, 7:] = 0
    padded[2, 3:] = 0
    types = torch.zeros(3, 12, dtype=torch.long)
    types[:, 6:] = 1
    return [
        {"input_ids": ids[:1, :5], "attention_mask": torch.ones(1, 5, dtype=torch.long)},
        {"input_ids": ids, "attention_mask": padded, "token_type_ids": types},
        {"input_ids": ids, "attention_mask": torch.ones(3, 12, dtype=torch.long)},
    ]


@torch.inference_mode()
def assert_identical(reference: torch.nn.Module, mine: Bert) -> None:
    for inputs in batches():
        expected = reference(**inputs, output_hidden_states=True)
        got = mine(**inputs, output_hidden_states=True)
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
        assert len(got.hidden_states) == len(expected.hidden_states)
        assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states, strict=True))


def test_same_hidden_states_as_transformers() -> None:
    config = BertConfig(**TINY_BERT)
    assert BertArgs.supports(config)
    assert_identical(*pair(config))


def test_same_hidden_states_when_quantized() -> None:
    reference, mine = pair(BertConfig(**TINY_BERT))
    quantize_modules(reference, "int8")
    install_quant_modules(mine, checkpoint.encoder_plan(reference, [])["names"], "int8")
    mine.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert_identical(reference, mine)


def test_serves_only_what_it_computes_exactly() -> None:
    assert not BertArgs.supports(BertConfig(**TINY_BERT, architectures=["BertForSequenceClassification"]))
    assert not BertArgs.supports(BertConfig(**TINY_BERT, hidden_act="gelu_new"))
    assert not BertArgs.supports(BertConfig(**TINY_BERT, position_embedding_type="relative_key"))
