"""The fields that take one text or a list of them (/classify inputs, /v1/completions prompt, /v1/embeddings
input) share one check: 1 to N texts, none blank, the error naming the field."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from server.schemas import ClassifyRequest
from server.schemas_openai import CompletionRequest, EmbeddingRequest

pytestmark = pytest.mark.unit

FIELDS = [
    (ClassifyRequest, "inputs", {}, "texts"),
    (CompletionRequest, "prompt", {"model": "m"}, "prompts"),
    (EmbeddingRequest, "input", {"model": "m"}, "texts"),
]


@pytest.mark.parametrize(("model", "field", "rest", "texts"), FIELDS)
def test_one_text_or_a_list_is_a_list(model: type[BaseModel], field: str, rest: dict, texts: str) -> None:
    assert getattr(model.model_validate({**rest, field: "a"}), texts) == ["a"]
    assert getattr(model.model_validate({**rest, field: ["a", "b"]}), texts) == ["a", "b"]


@pytest.mark.parametrize(("model", "field", "rest", "texts"), FIELDS)
@pytest.mark.parametrize(("value", "message"), [([], "must not be empty"), (["a", " \n"], "or whitespace"), ("", "")])
def test_empty_or_blank_texts_are_refused_naming_the_field(
    model: type[BaseModel], field: str, rest: dict, texts: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate({**rest, field: value})
    (error,) = caught.value.errors()
    assert error["loc"][0] == field and message in error["msg"]
    assert error["msg"].startswith(f"Value error, {field} ")


def test_completions_take_at_most_16_prompts() -> None:
    assert len(CompletionRequest.model_validate({"model": "m", "prompt": ["a"] * 16}).prompts) == 16
    with pytest.raises(ValidationError, match="prompt takes at most 16 texts"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a"] * 17})
