"""Should an API server tokenize prompts and render chat templates off its event loop (issue 18, item 4)?
Measures, on the embedded SmolLM2 tokenizer as the API server runs it (one tokenizer thread, one torch
thread), what one encoding costs inline, what a hop to a worker thread adds, and, with many requests
encoding at once, the event loop's stalls (a 1 ms heartbeat's lateness: what a stream's next token or a
probe waits) and the encodings per second, inline vs on one worker thread (one per API server, as
the server would: several would multiply each API server's share of the host's cores).

    python -m load_tests.tokenize_offload --out load_tests/results/tokenize_offload/results.json

Results and the decision they led to: load_tests/results/tokenize_offload/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as in an API server (server/workers.py)

import torch

from models.loader import load_tokenizer
from models.sources import embedded_gguf_path
from server.chat_template import encode_chat
from server.config import default_cache_dir

SENTENCE = "My order arrived damaged and I would like a refund or a replacement, whichever is faster. "
MAX_CHARS = 2048 * 16  # the default prompt bound: 16 characters per token of max_input_tokens
WORKER = ThreadPoolExecutor(1, thread_name_prefix="tokenize")


async def off_loop(fn: Callable[[], object]) -> object:
    return await asyncio.get_running_loop().run_in_executor(WORKER, fn)


def workloads(tokenizer: object) -> dict[str, Callable[[], object]]:
    def text(n_chars: int) -> Callable[[], object]:
        prompt = (SENTENCE * (n_chars // len(SENTENCE) + 1))[:n_chars]
        return lambda: tokenizer([prompt]).input_ids  # type: ignore[operator]

    def chat(n_chars: int) -> Callable[[], object]:
        turn = (SENTENCE * (n_chars // len(SENTENCE) // 3 + 1))[: n_chars // 3]
        messages = [
            {"role": "system", "content": turn},
            {"role": "user", "content": turn},
            {"role": "assistant", "content": turn},
            {"role": "user", "content": "And?"},
        ]
        return lambda: encode_chat(tokenizer, messages)  # type: ignore[arg-type]

    return {
        "text 300 chars": text(300),
        "text 1k chars": text(1024),
        "text 2k chars": text(2048),
        "text 4k chars": text(4096),
        f"text {MAX_CHARS // 1024}k chars (max)": text(MAX_CHARS),
        "chat 300 chars": chat(300),
        f"chat {MAX_CHARS // 1024}k chars (max)": chat(MAX_CHARS),
    }


def per_call_us(fn: Callable[[], object], repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


async def hop_us(fn: Callable[[], object], repeat: int) -> float:
    await off_loop(fn)
    start = time.perf_counter()
    for _ in range(repeat):
        await off_loop(fn)
    return (time.perf_counter() - start) / repeat * 1e6


async def under_load(fn: Callable[[], object], offload: bool, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` requests encoding back to back for ``seconds``; a heartbeat measures the loop's stalls."""
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    lateness: list[float] = []
    done = 0

    async def heartbeat() -> None:
        while loop.time() < stop:
            before = loop.time()
            await asyncio.sleep(0.001)
            lateness.append((loop.time() - before - 0.001) * 1e3)

    async def client() -> None:
        nonlocal done
        while loop.time() < stop:
            if offload:
                await off_loop(fn)
            else:
                fn()
                await asyncio.sleep(0)  # a request's other awaits (receive, admission, engine)
            done += 1

    await asyncio.gather(heartbeat(), *(client() for _ in range(clients)))
    lateness.sort()
    return {
        "encodings_per_s": round(done / seconds, 1),
        "loop_stall_p50_ms": round(statistics.median(lateness), 3),
        "loop_stall_p99_ms": round(lateness[int(len(lateness) * 0.99)], 3),
        "loop_stall_max_ms": round(lateness[-1], 3),
    }


async def main(out: Path, seconds: float, clients: int) -> None:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(str(embedded_gguf_path()), Path(os.environ.get("LLM_CACHE_DIR", default_cache_dir())))
    results: dict[str, object] = {"cpu_count": os.cpu_count(), "clients": clients, "seconds_per_run": seconds}
    noop_hop = await hop_us(lambda: None, 2000)
    results["thread_hop_of_a_noop_us"] = round(noop_hop, 1)
    print(f"worker-thread hop of a no-op: {noop_hop:.0f} us")
    for name, fn in workloads(tokenizer).items():
        repeat = 200 if "max" not in name else 20
        inline, hop = per_call_us(fn, repeat), await hop_us(fn, repeat)
        row: dict[str, object] = {"inline_us": round(inline, 1), "worker_thread_us": round(hop, 1)}
        for mode, offload in (("inline", False), ("worker_thread", True)):
            row[f"{mode}_under_load"] = await under_load(fn, offload, clients, seconds)
        results[name] = row
        print(name, json.dumps(row))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/tokenize_offload/results.json"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.out, args.seconds, args.clients))
