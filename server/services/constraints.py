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


# Compact JSON (no whitespace between tokens), so a weak model cannot spend its tokens on blank space. What it
# costs and what a few spaces or newlines would give instead: load_tests/results/constrained/layout/README.md.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


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
