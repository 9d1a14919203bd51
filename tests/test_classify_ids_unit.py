"""The engine builds a classification batch from the token ids an API server sends only where padding them
gives the tokenizer's own batch: checked per tokenizer, here on small in-memory tokenizers."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from engine.classifier import Classifier, EncoderFrontend

pytestmark = pytest.mark.unit

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "two", "words", "here", "longer", "text", "with", "12", "%", "off"]


def tokenizer(template: str, names: list[str], side: str = "right") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_input_names=names, padding_side=side
    )


class Batches(EncoderFrontend):
    """The classifier's batch building without a model."""

    _tokenize = Classifier._tokenize
    _padded = Classifier._padded
    _ids_pad_as_tokenized = Classifier._ids_pad_as_tokenized
    _ids_padded_right = None


BERT = ["input_ids", "token_type_ids", "attention_mask"]


@pytest.mark.parametrize(
    ("template", "names", "side", "usable"),
    [
        ("[CLS]:0 $A:0 [SEP]:0", BERT, "right", True),  # BERT-like: one segment, type 0
        ("[CLS]:0 $A:0 [SEP]:0", ["input_ids", "attention_mask"], "right", True),  # no segment types
        ("[CLS]:2 $A:0 [SEP]:0", BERT, "right", False),  # a special token's own type (Funnel-like)
        ("[CLS]:0 $A:0 [SEP]:0", BERT, "left", False),  # left padding
    ],
)
def test_ids_are_used_only_where_padding_them_gives_the_tokenizers_batch(
    template: str, names: list[str], side: str, usable: bool
) -> None:
    batches = Batches(tokenizer(template, names, side), False, [], 64, 8)
    assert batches._ids_pad_as_tokenized() is usable
    texts = ["a", "two words here", "a longer text with 12 % off"]
    padded, tokenized = batches._padded(batches.token_ids(texts)), batches._tokenize(texts)
    same = list(padded) == list(tokenized) and all(torch.equal(padded[k], tokenized[k]) for k in tokenized)
    assert same is usable  # the check's verdict is the truth on other texts too
