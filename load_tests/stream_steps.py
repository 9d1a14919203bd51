"""The engine alone under serve_bench's streaming load, every step timed with its shape (issue 11).

Where streamed clients stall together, this says whether the engine's steps are the cause and which: the
engine is made by the server's builder (``Engines.build``, the dummy 135M generator, decode steps captured but
not compiled), 256 requests of serve_bench's prompt and 128 new tokens run at once, each finished one replaced
at once, for ``--seconds``; each step is synchronized and timed with its rows, tokens, widest row and longest
context, and the last five seconds' steps are profiled (cProfile, by kind). Then 256 new requests arrive at
once and that first prefill step runs under torch.profiler (host ops and kernels)::

    python -m load_tests.stream_steps --tokenizer SMOLLM2_TOKENIZER_DIR --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seconds", type=float, default=12.0)
    args = p.parse_args()
    from load_tests.serve_bench import PROMPT, SERVER_ENV

    os.environ.update(  # serve_bench's server, generation alone
        {
            **SERVER_ENV,
            "LLM_MAX_NUM_SEQS": str(args.concurrency),
            "LLM_ENABLE_CLASSIFY": "false",
            "LLM_TOKENIZER": str(args.tokenizer),
            "LLM_COMPILE_DECODE": "off",
        }
    )
    from engine.protocol import AddRequest
    from engine.sequence import SamplingParams
    from server.config import Settings
    from server.runtime import Engines

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    built = Engines.build(Settings())
    built.warm_up()
    engine = built.engine
    assert engine is not None
    prompt = engine.tokenizer(PROMPT).input_ids
    keys = iter(range(1, 1 << 62))

    def add(n: int) -> None:
        for _ in range(n):
            key = next(keys)
            engine.add(AddRequest(key, list(prompt), SamplingParams(max_tokens=args.new_tokens), str(key)))

    shape: dict[str, int] = {}
    schedule = engine.scheduler.schedule

    def schedule_and_record() -> Any:
        seqs, prefill = schedule()
        shape.clear()
        if seqs:
            shape.update(
                rows=len(seqs),
                tokens=sum(s.num_scheduled for s in seqs),
                width=max(s.num_scheduled for s in seqs),
                context=max(s.num_tokens for s in seqs),
            )
        return seqs, prefill

    engine.scheduler.schedule = schedule_and_record  # type: ignore[method-assign]
    add(args.concurrency)
    steps: list[dict[str, Any]] = []
    stats: dict[str, pstats.Stats] = {}
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        profiler = cProfile.Profile() if time.perf_counter() > end - 5 else None
        sync()
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        outputs = engine.step()
        if profiler is not None:
            profiler.disable()
        sync()
        ms = (time.perf_counter() - t0) * 1e3
        kind = "prefill" if engine.scheduler.last_was_prefill else "decode"
        if profiler is not None:
            stats[kind] = stats[kind].add(profiler) if kind in stats else pstats.Stats(profiler)
        finished = sum(1 for o in outputs if o.finish_reason is not None)
        steps.append({"ms": round(ms, 3), "kind": kind, "finished": finished, **shape})
        add(finished)
    while engine.has_work():
        engine.step()
    add(args.concurrency)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        engine.step()
        sync()
        first_ms = (time.perf_counter() - t0) * 1e3

    def top(st: pstats.Stats) -> str:
        buf = io.StringIO()
        st.stream = buf  # type: ignore[attr-defined]
        st.sort_stats("tottime").print_stats(40)
        return buf.getvalue()

    by_kind = {
        kind: {"steps": len(rows), "ms_total": round(sum(r["ms"] for r in rows), 1)}
        for kind in ("prefill", "decode")
        if (rows := [s for s in steps if s["kind"] == kind])
    }
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "prompt_tokens": len(prompt),
        "budget": engine.scheduler.max_batched_tokens,
        "by_kind": by_kind,
        "first_prefill_ms": round(first_ms, 2),
        "first_prefill_kernels": prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        if torch.cuda.is_available()
        else "",
        "first_prefill_host_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30),
        **{f"cprofile_{kind}": top(st) for kind, st in stats.items()},
        "steps": steps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream_steps.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("prompt_tokens", "budget", "by_kind", "first_prefill_ms")}))


if __name__ == "__main__":
    main()
