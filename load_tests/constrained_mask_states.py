"""llguidance's cost per mask by grammar state: one matcher walks a fixed JSON text token by token and the
mask is timed before each token (median of ``--repeats`` fresh walks, the first one left out: it builds the
lexer's states), with the library's default slices, none, and finer ones for bounded strings.

    python -m load_tests.constrained_mask_states --tokenizer .bench/tok-smollm2 \\
        --out load_tests/results/constrained/lazy-cpu/states.json

The slices are llguidance's shortcut for big masks (a token set that a lexer state allows whole is added
without walking the token trie); a JSON string bounded below the shortest default slice walks the trie.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import llguidance
import llguidance.hf
from transformers import AutoTokenizer

from load_tests.constrained_bench import SCHEMA

CHAR = r'[^"\\\x00-\x1F\x7F]'
SLICES = {
    "default": None,
    "none": [],
    "finer": [r"[\x20\x0A\x0D\x09]+"] + [f"{CHAR}{{1,{n}}}" for n in (2, 4, 6, 8, 10, 12, 16, 20, 30)] + [CHAR + "+"],
}
OBJECT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}
WALKS = {
    "strings_max16": (SCHEMA, '["apple","banana split","x","hello world, hi","the quick brown","fox jumps over"'),
    "object": (OBJECT, '{"name":"John Smith","age":42,"tags":["red","blue"],"address":{"city":"Oslo","zip":"12345"}}'),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    report: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"), "walks": {}}
    report["llguidance"] = llguidance.get_version()
    for name, slices in SLICES.items():
        start = time.perf_counter()
        table = llguidance.hf.from_tokenizer(tokenizer, slices=slices)
        report.setdefault("table_build_ms", {})[name] = round((time.perf_counter() - start) * 1e3)
        for walk, (schema, text) in WALKS.items():
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, {"whitespace_flexible": False})
            ids = tokenizer.encode(text, add_special_tokens=False)
            times: list[list[float]] = [[] for _ in ids]
            for _ in range(args.repeats):
                matcher = llguidance.LLMatcher(table, grammar)
                for k, token in enumerate(ids):
                    start = time.perf_counter()
                    matcher.compute_bitmask()
                    times[k].append((time.perf_counter() - start) * 1e3)
                    assert matcher.consume_token(token), matcher.get_error()
            per_token = [round(statistics.median(t[1:]), 3) for t in times]
            prefixes = [tokenizer.decode(ids[:k]) for k in range(len(ids))]
            row = {"mean_ms": round(statistics.mean(per_token), 3), "ms_before_each_token": per_token}
            report["walks"].setdefault(walk, {"text_before_each_token": prefixes})[name] = row
            print(name, walk, row["mean_ms"], per_token, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
