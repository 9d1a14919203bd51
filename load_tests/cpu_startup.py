"""Seconds from starting the server to ``/ready`` on CPU, eager against compiled decode steps, the
compiled start once with an empty inductor cache (a first start) and once with the cache it filled
(every later start). The compressed-model cache is warmed first, so only the decode-step setup differs.

    HF_HUB_OFFLINE=1 python -m load_tests.cpu_startup --out load_tests/results/cpu_vs_llamacpp/startup.json

``--background``: the CPU default since decode steps compile after ``/ready`` (``--compile-decode auto``):
for eager steps (``off``), then the default with an empty inductor cache, then with the cache that start
filled, the seconds to ``/ready``, then rounds (one every ``--interval`` seconds, the cores idle in between
as between a user's requests) until every bucket is compiled (and ``--after`` more): one
batch-1 greedy stream through ``/generate`` (tokens/s between its first and last event, read by this
client; the seconds to its first event and the longest gap between two: stalls) and llama.cpp's batch-1
decode on the same GGUF and prompt in this process (cpu_bench.LlamaCpp, the same threads), each round
with the server's ``/info`` compile progress, so ours while compiling and after is beside llama.cpp under
the same load::

    HF_HUB_OFFLINE=1 python -m load_tests.cpu_startup --background --threads 2 \\
        --out load_tests/results/cpu_vs_llamacpp/background_compile/results.json

Not a test: minutes of compiling, never run in CI.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from load_tests.cpu_bench import LlamaCpp, decode_rate, machine
from load_tests.ready_time import free_port, stop_server, time_to_ready, wait_ready
from models.sources import resolve_spec

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def stream_rate(url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """One greedy stream through /generate: tokens/s after the first token, as this client sees the events,
    the seconds to the first event and the longest gap between two events (a stall: what a reader waits)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    times, tokens = [], 0
    sent = time.perf_counter()
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                times.append(time.perf_counter())
                event = json.loads(line[5:])
                tokens = event.get("usage", {}).get("completion_tokens", tokens)
    if tokens < 2 or len(times) < 2:
        return {"tokens": tokens, "tok_s": 0.0}
    return {
        "tokens": tokens,
        "tok_s": round((tokens - 1) / (times[-1] - times[0]), 2),
        "first_event_s": round(times[0] - sent, 3),
        "max_gap_s": round(max(b - a for a, b in itertools.pairwise(times)), 3),
    }


def concurrent_streams(url: str, n: int, tokens: int, cpp: LlamaCpp, prompt_ids: list[int]) -> dict[str, float]:
    """``n`` greedy streams through /generate at once (distinct prompts, so no prefix is shared): generated
    tokens/s of all of them over the wall time, against llama.cpp's batch-1 decode rate just after."""
    import threading

    counts = [0] * n

    def one(i: int) -> None:
        counts[i] = stream_rate(url, f"{i}: {PROMPT}", tokens)["tokens"]

    workers = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    aggregate = sum(counts) / (time.perf_counter() - start)
    ttft, total, made = cpp.generate(prompt_ids, tokens)
    single = decode_rate(ttft, total, made)
    return {
        "streams": n,
        "aggregate_tok_s": round(aggregate, 2),
        "llama_cpp_batch1_tok_s": round(single, 2),
        "ratio": round(aggregate / single, 2),
    }


def prefill_times(url: str, n_tokens: int, cpp: LlamaCpp, rounds: int = 3) -> dict[str, object]:
    """Time to the one token of a fresh ``n_tokens``-token prompt through /generate (HTTP and tokenizing
    included; a new prompt each round, so the prefix cache cannot answer) against llama.cpp's prefill of
    the same tokens in process; medians of ``rounds``."""
    ours, theirs = [], []
    for r in range(rounds):
        words = " ".join(f"w{r}x{i}" for i in range(n_tokens))
        ids = cpp.model.tokenize(words.encode(), add_bos=False)[:n_tokens]
        prompt = cpp.model.detokenize(ids).decode(errors="ignore")
        start = time.perf_counter()
        answer = httpx.post(f"{url}/generate", json={"prompt": prompt, "max_tokens": 1}, timeout=600).json()
        ours.append(time.perf_counter() - start)
        theirs.append(cpp.generate(cpp.model.tokenize(prompt.encode(), add_bos=False), 1)[0])
    return {
        "prompt_tokens": answer.get("usage", {}).get("prompt_tokens"),
        "ours_s": round(statistics.median(ours), 3),
        "llama_cpp_s": round(statistics.median(theirs), 3),
        "ratio": round(statistics.median(ours) / statistics.median(theirs), 2),
    }


def background_rounds(
    name: str, env: dict[str, str], cpp: LlamaCpp, args: argparse.Namespace, logs: Path
) -> dict[str, object]:
    """Starts the server, times /ready, then rounds of our stream and llama.cpp's until compiling is done
    (``--after`` more rounds) or ``--limit`` seconds after ready; stops it."""
    prompt_ids = cpp.model.tokenize(PROMPT.encode(), add_bos=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    log = (logs / f"{name.replace(' ', '_').replace(',', '')}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), "--log-level", "info"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rows: list[dict[str, object]] = []
    result: dict[str, object] = {"rows": rows}
    try:
        result["seconds_to_ready"] = round(wait_ready(proc, url, start, args.timeout, f"{name} (log {log.name})"), 1)
        ready = time.perf_counter()
        print(name, "ready after", result["seconds_to_ready"], flush=True)
        after = 0
        while time.perf_counter() - ready < args.limit and after < args.after:
            began = time.perf_counter()
            progress = httpx.get(f"{url}/info", timeout=30).json().get("decode_compile") or {}
            ours = stream_rate(url, PROMPT, args.tokens)
            ttft, total, n = cpp.generate(prompt_ids, args.tokens)
            row = {
                "since_ready_s": round(time.perf_counter() - ready, 1),
                "compile_state": progress.get("state", "off"),
                "compiled_batches": [c["batch"] for c in progress.get("compiled", [])],
                "ours_tok_s": ours["tok_s"],
                "ours_tokens": ours["tokens"],
                "ours_first_event_s": ours.get("first_event_s"),
                "ours_max_gap_s": ours.get("max_gap_s"),
                "llama_cpp_tok_s": round(decode_rate(ttft, total, n), 2),
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
            rows.append(row)
            print(name, row, flush=True)
            if row["compile_state"] in ("off", "done", "failed"):
                after += 1
            time.sleep(max(0.0, began + args.interval - time.perf_counter()))  # a user's pause: idle cores
        # Each compiled bucket's "seconds" count from the start of compiling, which the runtime starts as it
        # turns ready: seconds after /ready at which that batch size switched to its compiled step.
        result["decode_compile"] = httpx.get(f"{url}/info", timeout=30).json().get("decode_compile")
        if args.streams:
            result["streams"] = concurrent_streams(url, args.streams, args.tokens, cpp, prompt_ids)
            print(name, "streams", result["streams"], flush=True)
        if args.prefill:
            result["prefill"] = prefill_times(url, args.prefill, cpp)
            print(name, "prefill", result["prefill"], flush=True)
    finally:
        stop_server(proc)
        log.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--background", action="store_true", help="the background-compile default (see above)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (--background)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream (--background)")
    ap.add_argument("--limit", type=float, default=1200, help="seconds after /ready to wait for compiling")
    ap.add_argument("--interval", type=float, default=10, help="seconds from one round's start to the next")
    ap.add_argument("--after", type=int, default=3, help="rounds once compiling is done (eager: rounds in all)")
    ap.add_argument(
        "--inductor-cache", type=Path, help="--background: start only eager and from this (warm) inductor cache"
    )
    ap.add_argument(
        "--runs", default="eager,empty,warm", help="--background: which starts, of eager, empty (cache), warm"
    )
    ap.add_argument("--streams", type=int, default=0, help="--background: then N concurrent streams")
    ap.add_argument("--prefill", type=int, default=0, help="--background: then the time to prefill N tokens")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = datetime.now(timezone.utc)
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLM_") and k != "TORCHINDUCTOR_CACHE_DIR"}
    results: dict[str, object] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="inductor-") as inductor:
        if args.background:
            cpp = LlamaCpp(Path(resolve_spec("default", "generate").path), args.threads)
            runs = [
                ("eager", {"LLM_COMPILE_DECODE": "off"}),
                (
                    "background, empty inductor cache",
                    {"LLM_COMPILE_DECODE": "auto", "TORCHINDUCTOR_CACHE_DIR": inductor},
                ),
                (
                    "background, inductor cache warm",
                    {"LLM_COMPILE_DECODE": "auto", "TORCHINDUCTOR_CACHE_DIR": inductor},
                ),
            ]
            if args.inductor_cache is not None:
                given = {"LLM_COMPILE_DECODE": "auto", "TORCHINDUCTOR_CACHE_DIR": str(args.inductor_cache)}
                runs = [runs[0], ("background, inductor cache given", given)]
            else:
                chosen = args.runs.split(",")
                runs = [run for run, name in zip(runs, ("eager", "empty", "warm"), strict=True) if name in chosen]
            for name, extra in runs:
                results[name] = background_rounds(name, {**base, **extra}, cpp, args, args.out.parent)
        else:
            runs = [
                ("eager (compressed-model cache warm)", {"LLM_COMPILE_DECODE": "off"}),
                ("eager", {"LLM_COMPILE_DECODE": "off"}),
                ("compiled, empty inductor cache", {"LLM_COMPILE_DECODE": "on", "TORCHINDUCTOR_CACHE_DIR": inductor}),
                ("compiled, inductor cache warm", {"LLM_COMPILE_DECODE": "on", "TORCHINDUCTOR_CACHE_DIR": inductor}),
            ]
            for name, extra in runs:
                results[name] = round(time_to_ready([], {**base, **extra}, args.timeout)[0], 1)
                print(name, results[name], flush=True)
    m = machine()
    out = {
        "command": "python -m load_tests.cpu_startup " + " ".join(sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: v for k, v in m.items() if k != "lscpu"},
        "seconds_to_ready" if not args.background else "runs": results,
    }
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
