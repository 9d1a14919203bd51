"""Output constraints from request fields, as llguidance grammars that the engine enforces token by token
(engine/constraints.py): a JSON schema, any JSON object, a regular expression, one of a list of strings.
Each grammar is validated here, so a schema the library cannot compile is a 400 naming the field before
anything is queued."""

from __future__ import annotations

import json
from typing import Any

import llguidance

from engine import constraints
from server.errors import APIError

Grammar = llguidance.LLMatcher


def checked(grammar: str, field: str) -> str:
    problem = constraints.validate(grammar)
    if problem is not None:
        raise APIError(400, f"{field}: the grammar library cannot compile it: {problem}", field=field)
    return grammar


# JSON answers keep the model's own layout within bounds: at most eight spaces or newlines between two JSON
# tokens. Compact JSON (none) fought small models' newline after "[" or "{": the embedded model answered []
# to every list request; unbounded whitespace would let a weak model spend its tokens on blank space. Nested
# objects then take more tokens (their indentation): load_tests/results/constrained/layout/README.md.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A]{0,8}"}


def json_schema(schema: dict[str, Any], field: str) -> str:
    """Output that is JSON valid against ``schema``, laid out as :data:`JSON_OPTIONS` allows."""
    try:
        grammar = Grammar.grammar_from_json_schema(schema, JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"{field}: not a usable JSON schema: {exc}", field=field) from exc
    return checked(grammar, field)


def json_object(field: str) -> str:
    return json_schema({"type": "object"}, field)


def regex(pattern: str, field: str) -> str:
    return checked(Grammar.grammar_from_regex(pattern), field)


def choice(options: list[str], field: str) -> str:
    return checked(Grammar.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options)), field)


def lark(grammar: str, field: str) -> str:
    return checked(Grammar.grammar_from_lark(grammar), field)
