"""Time to first token with a long shared system prompt, prefix cache on against off, in one run.

A chatbot resends the same ~1,000-token system prompt with every turn; with prefix caching only
the new user turn is prefilled. Two engines share one loaded model (same weights, same process,
same moment); requests alternate between them (which one goes first alternates too), one request
at a time, so machine noise lands on both sides alike. Each request is the system prompt plus a
different customer message, rendered with the model's chat template. The cache-on engine's first
request fills the cache and is reported apart ("cold"); the rest are its steady state.

    python -m load_tests.prefix_cache_bench --out load_tests/results/prefix_cache

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from engine.llm_engine import AsyncLLM, LLMEngine
from engine.sequence import SamplingParams
from load_tests.loadgen import environment_info
from load_tests.report import write_results
from server.config import Settings
from server.runtime import Runtime

DATA = Path(__file__).resolve().parent.parent / "data"


def system_prompt(tokenizer: Any, target_tokens: int) -> str:
    """Support-assistant instructions followed by example dialogues (data/calibration.txt) up to
    about ``target_tokens`` tokens."""
    head = (
        "You are the customer-service assistant of an online shop. Answer in one or two short, friendly "
        "sentences. Here are example conversations showing the tone and the policies to follow:\n\n"
    )
    lines = [ln for ln in (DATA / "calibration.txt").read_text().splitlines() if ln.startswith(("User:", "Assist"))]
    text = head
    for line in lines:
        if len(tokenizer(text + line + "\n").input_ids) > target_tokens:
            break
        text += line + "\n"
    return text


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def questions() -> list[str]:
    rows = [json.loads(line) for line in (DATA / "intents.jsonl").read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows[::7]]  # spread over the intents


async def ttft(llm: AsyncLLM, prompt_ids: list[int], max_tokens: int, request_id: str) -> tuple[float, int]:
    """Seconds from submission to the first generated chunk, and the prompt tokens served from the cache."""
    start = time.perf_counter()
    first: float | None = None
    cached = 0
    async for chunk in llm.generate(prompt_ids, SamplingParams(max_tokens=max_tokens), request_id):
        if first is None:
            first = time.perf_counter() - start
        cached = chunk.cached_tokens
    assert first is not None
    return first, cached


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1),
        "p90_ms": round(p90 * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(
        gen_model=args.model,
        enable_classify=False,
        max_input_tokens=args.system_tokens + 256,
        max_batched_tokens=max(4096, args.system_tokens + 256),
        device=args.device,
    )
    runtime = await asyncio.to_thread(Runtime.load, settings)
    assert runtime.llm is not None
    base = runtime.llm.engine
    tokenizer = base.tokenizer
    engines = {}
    for enabled in (True, False):
        config = dataclasses.replace(base.config, enable_prefix_caching=enabled)
        engine = LLMEngine(base.runner.model, tokenizer, base.runner.device, base.runner.k_cache.dtype, config)
        engines["on" if enabled else "off"] = AsyncLLM(engine)
    for llm in engines.values():
        llm.start()
    system = system_prompt(tokenizer, args.system_tokens)
    system_tokens = len(tokenizer(system).input_ids)
    asks = questions()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": asks[i % len(asks)]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for i in range(args.requests + 1)
    ]
    load_before = os.getloadavg()
    try:
        # Warm both engines' code paths on an unrelated short prompt (not a prefix of the system prompt).
        for name, llm in engines.items():
            await ttft(llm, tokenizer("Hello there, how are you?").input_ids, 2, f"warmup-{name}")
        cold, cold_cached = await ttft(engines["on"], prompts[0], args.max_tokens, "cold")
        samples: dict[str, list[float]] = {"on": [], "off": []}
        cached_tokens: list[int] = []
        for i, prompt in enumerate(prompts[1:]):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                seconds, cached = await ttft(engines[name], prompt, args.max_tokens, f"{name}-{i}")
                samples[name].append(seconds)
                if name == "on":
                    cached_tokens.append(cached)
    finally:
        for llm in engines.values():
            await asyncio.to_thread(llm.stop)
    on, off = summarize(samples["on"]), summarize(samples["off"])
    prompt_lens = [len(p) for p in prompts[1:]]
    return {
        "benchmark": "prefix_cache_ttft",
        "environment": {
            **environment_info("in-process engines (no HTTP)"),
            "processor": cpu_model(),
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(base.runner.device),
            "dtype": str(base.runner.k_cache.dtype),
            "command": "python -m load_tests.prefix_cache_bench " + " ".join(sys.argv[1:]),
        },
        "config": {
            "model": runtime.served.info["generate"]["model"],
            "system_prompt_tokens": system_tokens,
            "prompt_tokens_median": statistics.median(prompt_lens),
            "requests_per_mode": args.requests,
            "max_tokens": args.max_tokens,
            "block_size": settings.kv_block_size,
        },
        "cold_first_request_ms": round(cold * 1000, 1),
        "cold_cached_tokens": cold_cached,
        "cache_on": {**on, "cached_tokens_median": statistics.median(cached_tokens)},
        "cache_off": off,
        "ttft_ratio_off_over_on_median": round(off["median_ms"] / on["median_ms"], 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(doc: dict[str, Any]) -> str:
    env, cfg, on, off = doc["environment"], doc["config"], doc["cache_on"], doc["cache_off"]
    rows = [
        "| prefix cache | requests | TTFT median (ms) | mean | p90 | min | max | prompt tokens from cache (median) |",
        "|---|---|---|---|---|---|---|---|",
        f"| on | {on['n']} | {on['median_ms']} | {on['mean_ms']} | {on['p90_ms']} | {on['min_ms']} | {on['max_ms']} "
        f"| {on['cached_tokens_median']} |",
        f"| off | {off['n']} | {off['median_ms']} | {off['mean_ms']} | {off['p90_ms']} | {off['min_ms']} "
        f"| {off['max_ms']} | 0 |",
    ]
    return "\n".join(
        [
            "# Prefix cache: time to first token with a shared system prompt",
            "",
            f"Command: `{env['command']}`  ",
            f"Date: {doc['date']}  ",
            f"Hardware: {env['machine']} ({env['processor']}), {env['cpu_count']} CPUs visible, "
            f"torch {env['torch']} with {env['torch_threads']} threads, device {env['device']}, {env['dtype']}; "
            f"a shared machine: 1-minute load average {env['load_average_1m_before_after'][0]} before, "
            f"{env['load_average_1m_before_after'][1]} after  ",
            f"Model: {cfg['model']}  ",
            f"Prompt: {cfg['system_prompt_tokens']}-token system prompt + a different customer message each time "
            f"(median {cfg['prompt_tokens_median']} tokens in all), max_tokens {cfg['max_tokens']}, "
            f"one request at a time, on/off alternating",
            "",
            *rows,
            "",
            f"**TTFT ratio (off / on, medians): {doc['ttft_ratio_off_over_on_median']}×**. "
            f"The cache-on engine's first request (cold, fills the cache): {doc['cold_first_request_ms']} ms.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="generation model spec (see --gen-model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--system-tokens", type=int, default=1024, help="approximate system prompt length")
    parser.add_argument("--requests", type=int, default=20, help="measured requests per mode")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/prefix_cache"))
    args = parser.parse_args(argv)
    doc = asyncio.run(run(args))
    write_results(args.out, doc, markdown(doc))


if __name__ == "__main__":
    main()
