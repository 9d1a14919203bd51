"""The engine's host time per decode step and per token, with and without speculation, the model taken out.

The decode graphs' replay is replaced by an instant fake whose greedy tokens follow a fixed cycle of tokens (a
prompt that repeats the cycle lets prompt lookup propose it, and the fake accepts every proposal), so what
is timed is the engine's own Python work: scheduling, proposals, staging, verification, outputs, metrics. A
tiny random Llama runs the prefills. On a GPU this work sits between the device's steps; this measures it on
whatever CPU runs the script, as a proxy for a GPU host's.

    python -m load_tests.spec_host_time --batch 1 64 --out load_tests/results/speculative/host_time

Writes ``results.json`` and ``results.md`` under ``--out``. Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from engine.llm_engine import EngineConfig, LLMEngine
from engine.protocol import AddRequest
from engine.sequence import SamplingParams
from load_tests.loadgen import environment_info
from load_tests.prefix_cache_bench import cpu_model
from load_tests.report import write_results
from models.llama import Llama

VOCAB = 512
CYCLE = np.arange(100, 140)  # the fake model's text: these tokens over and over


def engine_for(model: Llama, batch: int, speculative: bool) -> LLMEngine:
    config = EngineConfig(
        max_num_seqs=batch,
        kv_cache_tokens=65536,
        max_model_len=2048,
        speculative="ngram" if speculative else "none",
    )
    engine = LLMEngine(model, types.SimpleNamespace(eos_token_id=VOCAB - 1), torch.device("cpu"), torch.float32, config)
    engine.clock = itertools.count().__next__  # every step costs the same: the speed gate stays open
    decode = engine.runner.decode
    logits: dict[tuple[int, int], Tensor] = {}

    def replay(batch: int, kv_len: int, width: int, q: int = 1) -> tuple[Tensor, Tensor]:
        positions = decode.staging_np[:batch, q][:, None] + np.arange(q)[None, :]
        greedy = torch.from_numpy(CYCLE[(positions + 1) % len(CYCLE)].reshape(-1))
        return greedy, logits.setdefault((batch, q), torch.zeros(batch * q, VOCAB))

    decode.replay = replay  # type: ignore[method-assign]
    return engine


def measure(model: Llama, batch: int, speculative: bool, rounds: int, new_tokens: int) -> dict[str, Any]:
    engine = engine_for(model, batch, speculative)
    prompt = [1, 2, 3, *CYCLE.tolist() * 3]
    per_step, per_token = [], []
    for r in range(rounds):
        for i in range(batch):
            engine.add(AddRequest(r * batch + i, prompt, SamplingParams(max_tokens=new_tokens), f"r{i}"))
        engine.step()  # the prefill (the tiny model)
        steps = tokens = 0
        start = time.perf_counter()
        while engine.has_work():
            tokens += sum(1 for out in engine.step() if out.token is not None)
            steps += 1
        elapsed = time.perf_counter() - start
        per_step.append(1e6 * elapsed / steps)
        per_token.append(1e6 * elapsed / tokens)
    return {
        "batch": batch,
        "speculative": speculative,
        "tokens_per_step": round(tokens / steps, 2),
        "us_per_step_median": round(statistics.median(per_step), 1),
        "us_per_token_median": round(statistics.median(per_token), 2),
        "rounds_us_per_token": [round(x, 2) for x in per_token],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5, help="waves per configuration, plain and speculative interleaved")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048,
    )  # fmt: skip
    model = Llama.from_hf(config, LlamaForCausalLM(config).state_dict())
    results = []
    for batch in args.batch:
        for speculative in (False, True):
            results.append(measure(model, batch, speculative, args.rounds, args.new_tokens))
            print(results[-1], flush=True)
    doc = {
        "benchmark": "speculative_host_time",
        "environment": {
            **environment_info("the engine stepped in process, the model's decode steps replaced by an instant fake"),
            "processor": cpu_model(),
            "command": "python -m load_tests.spec_host_time " + " ".join(sys.argv[1:]),
        },
        "results": results,
    }
    env = doc["environment"]
    rows = [
        "| batch | speculation | tokens per step | host µs per step | host µs per token |",
        "|---|---|---|---|---|",
        *(
            f"| {r['batch']} | {'on' if r['speculative'] else 'off'} | {r['tokens_per_step']} "
            f"| {r['us_per_step_median']} | {r['us_per_token_median']} |"
            for r in results
        ),
    ]
    md = "\n".join(
        [
            "# The engine's host time with and without speculation (model replaced by an instant fake)",
            "",
            f"Command: `{env['command']}`  ",
            f"Date: {env['date']}; {env['processor']}, {env['cpu_count']} CPUs visible; medians over "
            f"{args.rounds} waves of {args.new_tokens} tokens per request; every proposal accepted",
            "",
            *rows,
            "",
        ]
    )
    write_results(args.out, doc, md)


if __name__ == "__main__":
    main()
