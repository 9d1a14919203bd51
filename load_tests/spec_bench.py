"""Speculative decoding on against off, in one run: acceptance, tokens/s per request and aggregate throughput.

Two workloads (load_tests/data/spec_prompts.json): **retrieval**, a support article plus a question whose
answer quotes it (what a retrieval-backed support bot sends, where prompt lookup pays), and **freeform**,
open requests with nothing to copy (where speculation must back off). Each runs at 1, 16 and 64 concurrent
requests (``--concurrency``), speculation on and off interleaved in rounds (a wave of c requests on, one
off, the same prompts, which goes first alternating; ``--sequential`` rounds at 1, ``--rounds`` above), on
one engine loaded by the server's builder: requests set ``speculative`` themselves, so both sides share the
model, the process and the moment. Greedy decoding, so the two sides' texts can be compared.

Per request: decode tokens/s (tokens after the first over the time from first to last token) and end to
end (all tokens over scheduling to last token); aggregate: all tokens over the level's wall time.
Acceptance: accepted / proposed draft tokens (the engine's counters), and tokens per verifying row. Per side also the
engine's decode steps (count, mean time, share of the wall time spent in them) and, after each level, the speed
gates' own view (engine/speculative.py ``SpeedGate``): whether steps with drafts looked faster to them.
Identical texts are expected on a GPU at concurrency 1, where a batch-1 verification step reproduces decode
steps bit for bit (the fused GEMMs); elsewhere the wider verification forward and the one-token decode step may
round differently, and greedy near-ties can flip. Prefix caching is off, so both
sides prefill the same prompts alike (a cached prefix would leave the second side a shorter prefill chunk,
rounded differently).

    python -m load_tests.spec_bench --device cpu --out load_tests/results/speculative/cpu
    python -m load_tests.spec_bench --device cuda --model dummy:smollm2-1.7b --out load_tests/results/speculative/h200
    python -m load_tests.spec_bench --device cuda --model dummy:smollm2-1.7b --draft-model dummy:smollm2-135m ...

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine import metrics
from engine.llm_engine import AsyncLLM, GenerationChunk
from engine.sequence import SamplingParams
from load_tests.loadgen import environment_info
from load_tests.prefix_cache_bench import cpu_model
from load_tests.report import write_results
from server.config import Settings
from server.runtime import Runtime

PROMPTS = Path(__file__).resolve().parent / "data" / "spec_prompts.json"


def prompts(tokenizer: Any) -> dict[str, list[list[int]]]:
    """Each workload's prompts as token ids, rendered with the model's chat template when it has one."""
    data = json.loads(PROMPTS.read_text())
    texts = {
        "retrieval": [
            f"{data['retrieval_instruction']}\n\nArticle:\n{r['article']}\n\nQuestion: {r['question']}"
            for r in data["retrieval"]
        ],
        "freeform": list(data["freeform"]),
    }

    def encode(text: str) -> list[int]:
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": text}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return tokenizer(text).input_ids

    return {name: [encode(t) for t in items] for name, items in texts.items()}


def counters() -> tuple[float, ...]:
    """Speculation's counters, then the decode steps' count and summed seconds (the engine's step histogram)."""
    steps = metrics.STEP_TIME.labels(phase="decode")
    return (
        metrics.SPEC_PROPOSED._value.get(),
        metrics.SPEC_ACCEPTED._value.get(),
        metrics.SPEC_VERIFIED._value.get(),
        sum(bucket.get() for bucket in steps._buckets),
        steps._sum.get(),
    )


def gates(speculator: Any) -> dict[str, dict[str, Any]]:
    """The speed gates' view at the end of a level, per batch-size bucket: tokens per row per second of decode steps
    with drafts and without, their step times (decayed averages), and whether the gate is closed or counts
    verification as cheap. The gates live as long as the engine: the averages lean on the last steps, the step
    counts run over every level so far."""
    return {
        str(rows): {
            "tokens_per_row_per_s_with_drafts": round(g.spec, 1),
            "tokens_per_row_per_s_without": round(g.plain, 1),
            "step_ms_with_drafts": round(1e3 * g.spec_step, 3),
            "step_ms_without": round(1e3 * g.plain_step, 3),
            "steps_measured_with_drafts": g.spec_timed,
            "steps_measured_without": g.plain_timed,
            "closed_steps_left": g.closed,
            "cheap": g.cheap(),
        }
        for rows, g in sorted(speculator.gates.items())
    }


async def one(llm: AsyncLLM, ids: list[int], params: SamplingParams, request_id: str) -> GenerationChunk:
    final = None
    async for chunk in llm.generate(ids, params, request_id, stream=False):
        final = chunk
    assert final is not None and final.timeline is not None
    return final


async def wave(
    llm: AsyncLLM, items: list[list[int]], start: int, concurrency: int, params: SamplingParams, tag: str
) -> tuple[list[GenerationChunk], float, tuple[float, ...]]:
    """``concurrency`` requests together (prompts from ``start`` on): their last chunks, the wall time and
    the increase of :func:`counters`."""
    before = counters()
    began = time.perf_counter()
    calls = [one(llm, items[(start + i) % len(items)], params, f"{tag}-{i}") for i in range(concurrency)]
    finals = list(await asyncio.gather(*calls))
    wall = time.perf_counter() - began
    return finals, wall, tuple(b - a for a, b in zip(before, counters(), strict=True))


def summary(
    finals: list[GenerationChunk],
    wall: float,
    proposed: float,
    accepted: float,
    verified: float,
    steps: float,
    step_seconds: float,
) -> dict:
    decode, e2e = [], []
    for f in finals:
        line = f.timeline
        assert line is not None
        if f.completion_tokens > 1 and line.finished > line.first_token:
            decode.append((f.completion_tokens - 1) / (line.finished - line.first_token))
        e2e.append(f.completion_tokens / max(line.finished - line.scheduled, 1e-9))
    tokens = sum(f.completion_tokens for f in finals)
    return {
        "requests": len(finals),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "decode_tokens_per_s_per_request_median": round(statistics.median(decode), 2) if decode else None,
        "e2e_tokens_per_s_per_request_median": round(statistics.median(e2e), 2),
        "proposed": int(proposed),
        "accepted": int(accepted),
        "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
        "tokens_per_verifying_row": round((accepted + verified) / verified, 2) if verified else None,
        "decode_steps": int(steps),
        "decode_step_ms_mean": round(1e3 * step_seconds / steps, 3) if steps else None,
        "wall_share_in_decode_steps": round(step_seconds / wall, 3),
    }


async def level(
    llm: AsyncLLM, items: list[list[int]], concurrency: int, rounds: int, max_tokens: int, tag: str
) -> dict:
    """On and off interleaved: ``rounds`` waves of each (which goes first alternates; a round's two waves
    send the same prompts), so the shared machine's load lands on both sides alike."""
    sides: dict[bool, list] = {True: [[], 0.0, [0.0] * 5], False: [[], 0.0, [0.0] * 5]}
    same = 0
    for r in range(rounds):
        texts = {}
        for spec in (True, False) if r % 2 == 0 else (False, True):
            params = SamplingParams(max_tokens=max_tokens, speculative=spec)
            finals, wall, deltas = await wave(llm, items, r * concurrency, concurrency, params, f"{tag}-{r}-{spec}")
            side = sides[spec]
            side[0].extend(finals)
            side[1] += wall
            side[2] = [a + b for a, b in zip(side[2], deltas, strict=True)]
            texts[spec] = [f.text for f in finals]
        same += sum(a == b for a, b in zip(texts[True], texts[False], strict=True))
    on, off = (summary(sides[k][0], sides[k][1], *sides[k][2]) for k in (True, False))
    pair: dict[str, Any] = {"on": on, "off": off, "identical_texts": f"{same}/{rounds * concurrency}"}
    pair["speedup_aggregate"] = round(on["aggregate_tokens_per_s"] / off["aggregate_tokens_per_s"], 2)
    if on["decode_tokens_per_s_per_request_median"] and off["decode_tokens_per_s_per_request_median"]:
        pair["speedup_decode_per_request"] = round(
            on["decode_tokens_per_s_per_request_median"] / off["decode_tokens_per_s_per_request_median"], 2
        )
    return pair


async def run(args: argparse.Namespace) -> dict[str, Any]:
    top = max(args.concurrency)
    settings = Settings(
        gen_model=args.model,
        tokenizer=args.tokenizer,
        enable_classify=False,
        device=args.device,
        max_num_seqs=top,
        max_input_tokens=1024,
        max_new_tokens=max(args.max_tokens, 128),
        kv_cache_tokens=args.kv_cache_tokens,
        # Each request says whether it speculates; the setting only makes the engine compile and capture the
        # verification width for every bucket at startup, so no "on" request pays a capture mid-measurement.
        speculative="draft" if args.draft_model else "ngram",
        speculative_tokens=args.k,
        draft_model=args.draft_model,
        gen_quantize=args.quantize,
        enable_prefix_caching=False,  # both sides prefill alike (module docstring)
        **({"gen_prune": 0.0} if args.quantize == "none" else {}),  # float: unpruned; else the device's default
    )
    runtime = await asyncio.to_thread(Runtime.load, settings)
    llm = runtime.llm
    assert isinstance(llm, AsyncLLM)
    await runtime.start()
    engine = llm.engine
    workloads = prompts(engine.tokenizer)
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    try:
        for name in args.workloads:
            items = workloads[name]
            for spec in (False, True):  # warm both paths on this workload's shapes
                await one(llm, items[0], SamplingParams(max_tokens=8, speculative=spec), f"warm-{name}-{spec}")
            for c in args.concurrency:
                rounds = args.sequential if c == 1 else args.rounds
                for spec in (False, True)[: 2 * args.warmup_waves]:  # CUDA graphs of new buckets are captured now
                    params = SamplingParams(max_tokens=args.max_tokens, speculative=spec)
                    await wave(llm, items, 0, c, params, f"warm-{name}-{c}-{spec}")
                results[f"{name}@{c}"] = pair = await level(llm, items, c, rounds, args.max_tokens, f"{name}-{c}")
                pair["gates"] = gates(engine.speculator)
                print(name, c, json.dumps(pair), flush=True)
    finally:
        await runtime.stop()
    return {
        "benchmark": "speculative_decoding",
        "environment": {
            **environment_info("in-process engine (no HTTP), built by server.runtime.Engines.build"),
            "processor": cpu_model() if engine.runner.device.type == "cpu" else torch.cuda.get_device_name(),
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(engine.runner.device),
            "dtype": str(engine.runner.k_cache.dtype),
            "command": "python -m load_tests.spec_bench " + " ".join(sys.argv[1:]),
        },
        "config": {
            "model": runtime.served.info["generate"],
            "method": engine.speculator.method,
            "speculative_tokens": args.k,
            "max_tokens": args.max_tokens,
            "rounds": {"at_1": args.sequential, "above_1": args.rounds},
            "warmup_waves_per_level": args.warmup_waves,
            "prompt_tokens_median": {n: statistics.median(map(len, p)) for n, p in workloads.items()},
            "quantization": runtime.served.reports["generate"].spec.quantize
            if "generate" in runtime.served.reports
            else None,
        },
        "results": results,
    }


def markdown(doc: dict[str, Any]) -> str:
    env, cfg = doc["environment"], doc["config"]
    rows = [
        "| workload @ concurrency | acceptance | tokens / verifying row | decode tok/s per request on / off "
        "| speed-up per request | aggregate tok/s on / off | speed-up aggregate | identical texts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in doc["results"].items():
        on, off = r["on"], r["off"]
        rows.append(
            f"| {key} | {on['acceptance_rate']} | {on['tokens_per_verifying_row']} "
            f"| {on['decode_tokens_per_s_per_request_median']} / {off['decode_tokens_per_s_per_request_median']} "
            f"| {r.get('speedup_decode_per_request')}x "
            f"| {on['aggregate_tokens_per_s']} / {off['aggregate_tokens_per_s']} "
            f"| {r['speedup_aggregate']}x | {r['identical_texts']} |"
        )
    return "\n".join(
        [
            "# Speculative decoding: on against off",
            "",
            f"Command: `{env['command']}`  ",
            f"Date: {env['date']}  ",
            f"Hardware: {env['machine']} ({env['processor']}), {env['cpu_count']} CPUs visible, torch {env['torch']} "
            f"with {env['torch_threads']} threads, device {env['device']}, {env['dtype']}; 1-minute load average "
            f"{env['load_average_1m_before_after'][0]} before, {env['load_average_1m_before_after'][1]} after  ",
            f"Model: {cfg['model']} (quantization {cfg['quantization']}); proposer {cfg['method']}, "
            f"k = {cfg['speculative_tokens']}; greedy, max_tokens {cfg['max_tokens']}; prompt tokens (median) "
            f"{cfg['prompt_tokens_median']}; on and off interleaved in rounds (a wave of c requests each side; "
            f"{cfg['rounds']['at_1']} rounds at 1, {cfg['rounds']['above_1']} above), figures over all rounds",
            "",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="generation model spec (see --gen-model)")
    parser.add_argument("--draft-model", default=None, help="draft model spec: requests speculate with it")
    parser.add_argument("--tokenizer", default=None, help="tokenizer files for a dummy preset (as --tokenizer)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--quantize", default="auto", choices=["auto", "none", "int8", "int8-wo", "fp8"], help="as --gen-quantize"
    )
    parser.add_argument("--k", type=int, default=4, help="speculative tokens per step")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--sequential", type=int, default=8, help="rounds (one request each side) at concurrency 1")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (a wave each side) at concurrency above 1")
    parser.add_argument(
        "--warmup-waves",
        type=int,
        choices=[0, 1],
        default=None,
        help="an untimed wave each side before each level (default: 1 on CUDA, where it captures the buckets' "
        "graphs, else 0)",
    )
    parser.add_argument("--workloads", nargs="+", default=["retrieval", "freeform"], choices=["retrieval", "freeform"])
    parser.add_argument("--kv-cache-tokens", type=int, default=40960)
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/speculative"))
    args = parser.parse_args(argv)
    if args.warmup_waves is None:
        args.warmup_waves = int(args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
    doc = asyncio.run(run(args))
    write_results(args.out, doc, markdown(doc))


if __name__ == "__main__":
    main()
