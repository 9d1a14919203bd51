"""What the grammar's JSON layout does to a model's structured answers: compact (no whitespace) against a few
spaces or newlines allowed, on the embedded model (or ``--model``), greedy, CPU or GPU.

Tasks through the engine the server builds, constrained by llguidance grammars compiled with each
``--options`` set (JSON compile options, e.g. the server's ``server.services.constraints.JSON_OPTIONS``):

- **lists**: "List {fruits, animals, ...} starting with {A, B, ...} as a JSON array." under an array schema
  (strings of at most 24 characters, at most 12): answers that validate, items, non-blank and distinct items,
  items starting with the asked letter;
- **extraction**: a customer message with a name and an order number, answered as a JSON object (name,
  order_id, an issue enum): answers that validate, names and order numbers right; and the same sampled
  (temperature 0.8, four seeds each): answers that validate and their length in tokens.

Also counts how often a row's most likely token was banned by its grammar (a mask had to decide), per token.

    python -m load_tests.json_layout_quality --out load_tests/results/constrained/layout
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import jsonschema
import llguidance

from engine import constraints, model_runner, sampler
from engine.llm_engine import LLMEngine
from engine.protocol import AddRequest
from engine.sequence import SamplingParams
from load_tests.constrained_bench import LIST_CASES, build, chat, model_arguments, varied_prompts
from load_tests.cpu_bench import machine
from server.services.constraints import JSON_OPTIONS

COMPACT = {"whitespace_flexible": False}  # no whitespace between JSON tokens
LIST_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 12}
EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "order_id": {"type": "string"},
        "issue": {"enum": ["damaged", "lost", "wrong_item", "billing", "delay", "other"]},
    },
    "required": ["name", "order_id", "issue"],
    "additionalProperties": False,
}
MESSAGES = [
    ("Ann Lee", "4521", "never arrived"),
    ("Bob Stone", "7730", "arrived broken"),
    ("Cara Diaz", "1189", "came in the wrong size"),
    ("Dan Wu", "5502", "was charged twice"),
    ("Eve Park", "3321", "is late"),
    ("Finn Moss", "9043", "is missing an item"),
    ("Gia Rossi", "6610", "never arrived"),
    ("Hugo Lam", "2287", "arrived broken"),
    ("Ivy Chen", "4415", "came in the wrong color"),
    ("Jon Kraus", "8876", "needs a refund"),
    ("Kim Ode", "1024", "is late"),
    ("Lea Marx", "3390", "was charged twice"),
]


class BannedArgmax:
    """Counts, per decode step, constrained rows whose most likely token their grammar bans."""

    def __init__(self) -> None:
        self.banned = 0

    def __call__(self, logits: Any, seqs: Any, greedy: Any = None) -> Any:
        if greedy is not None:
            for i, s in enumerate(seqs):
                c = s.constraint
                if c is not None and not constraints.settles(c, int(greedy[i])):
                    self.banned += 1
        return sampler.sample(logits, seqs, greedy)


def answers(
    engine: LLMEngine, prompts: list[list[int]], grammar: str, max_tokens: int, temperature: float = 0.0
) -> tuple[list[str], list[str], list[int]]:
    """Every prompt in one continuous batch (greedy, or sampled with a seed per prompt): each answer's text,
    finish reason and length in tokens."""
    tokens: dict[int, list[int]] = collections.defaultdict(list)
    reasons: dict[int, str] = {}
    for key, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, grammar=grammar, temperature=temperature, seed=key)
        engine.add(AddRequest(key, prompt, params, f"layout-{key}"))
    while engine.has_work():
        for out in engine.step():
            if out.token is not None and out.finish_reason is None:
                tokens[out.key].append(out.token)
            if out.finish_reason is not None:
                reasons[out.key] = out.finish_reason
    keys = range(len(prompts))
    return (
        [engine.tokenizer.decode(tokens[k]) for k in keys],
        [reasons[k] for k in keys],
        [len(tokens[k]) for k in keys],
    )


def parsed(text: str, schema: dict[str, Any]) -> Any:
    try:
        value = json.loads(text)
        jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError):
        return None
    return value


def measure(engine: LLMEngine, options: dict[str, Any]) -> dict[str, Any]:
    probe = BannedArgmax()
    model_runner.sample = probe
    try:
        cases = LIST_CASES[:60]
        grammar = llguidance.LLMatcher.grammar_from_json_schema(LIST_SCHEMA, options)
        texts, reasons, lengths = answers(engine, varied_prompts(engine)[: len(cases)], grammar, 200)
        lists = [parsed(t, LIST_SCHEMA) for t in texts]
        items = [(x.strip(), letter) for v, (_, letter) in zip(lists, cases, strict=True) if v for x in v]
        distinct = sum(len({x.lower() for x in v if x.strip()}) for v in lists if v)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(EXTRACT_SCHEMA, options)
        prompts = [
            chat(engine, f"Hi, I'm {n}. My order {o} {what}. Reply with JSON: name, order_id, issue.")
            for n, o, what in MESSAGES
        ]
        extracted, extract_reasons, _ = answers(engine, prompts, grammar, 120)
        objects = [parsed(t, EXTRACT_SCHEMA) for t in extracted]
        sampled, sampled_reasons, sampled_lengths = answers(engine, prompts * 4, grammar, 200, temperature=0.8)
    finally:
        model_runner.sample = sampler.sample
    return {
        "options": options,
        "lists": {
            "valid": sum(v is not None for v in lists),
            "answers": len(lists),
            "finish": dict(collections.Counter(reasons)),
            "items": len(items),
            "non_blank_share": round(sum(bool(x) for x, _ in items) / max(len(items), 1), 3),
            "distinct_share": round(distinct / max(len(items), 1), 3),
            "right_letter_share": round(sum(x[:1].upper() == c for x, c in items) / max(len(items), 1), 3),
            "tokens_per_answer": round(statistics.fmean(lengths), 1),
            "examples": texts[:3],
        },
        "extraction": {
            "valid": sum(v is not None for v in objects),
            "answers": len(objects),
            "finish": dict(collections.Counter(extract_reasons)),
            "name_right": sum(
                bool(v) and v["name"].strip() == n for v, (n, _, _) in zip(objects, MESSAGES, strict=True)
            ),
            "order_right": sum(
                bool(v) and v["order_id"].strip().lstrip("#") == o
                for v, (_, o, _) in zip(objects, MESSAGES, strict=True)
            ),
            "examples": extracted[:3],
        },
        "extraction_sampled": {  # temperature 0.8, four seeds per message
            "valid": sum(parsed(t, EXTRACT_SCHEMA) is not None for t in sampled),
            "answers": len(sampled),
            "finish": dict(collections.Counter(sampled_reasons)),
            "tokens_per_answer": round(statistics.fmean(sampled_lengths), 1),
            "examples": sampled[:2],
        },
        "banned_argmax_rows": probe.banned,
        "median_answer_chars": statistics.median(len(t) for t in texts + extracted),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument(
        "--options",
        nargs="+",
        default=[json.dumps(COMPACT), json.dumps(JSON_OPTIONS)],
        help="JSON compile options to compare (default: compact, and the server's)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    _, engine, _, _ = build(args, 64)
    runs = [measure(engine, json.loads(o)) for o in args.options]
    for run in runs:
        print(json.dumps({k: v for k, v in run.items() if not isinstance(v, dict) or k == "options"}), flush=True)
        for task in ("lists", "extraction", "extraction_sampled"):
            print("  ", task, json.dumps({k: v for k, v in run[task].items() if k != "examples"}), flush=True)
    report = {
        "command": "python -m load_tests.json_layout_quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "device": str(engine.runner.device),
        "cpu": machine()["cpu_model"],
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
