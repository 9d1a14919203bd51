"""Where a tensor-parallel batch-1 decode step's time goes, seen from rank 0 (issue 17).

A TP=2 step of the 8B-class model took 4.1 ms where its weights at one GPU's bandwidth take ~1.5 ms: this
times rank 0's side of batch-1 decode steps under torch.profiler — the host's work before the replay (the step
sent to the other ranks, inputs staged), the graph's kernels by kind, and each all-reduce's duration in order.
The row-parallel all-reduces wait for the slower rank, so the first one of a step measures how late the other
rank starts its replay, and later ones whether the ranks drift apart. The engine is made by the server's
builder (``Engines.build``), decode steps captured and not compiled unless ``--compile-decode on``::

    python -m load_tests.tp_timeline --tokenizer TOK --tp 2 --out DIR [--model dummy:llama-8b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STEPS = 24


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "all_reduce" in lowered or "allreduce" in lowered or "nccl" in lowered or "one_shot" in lowered:
        return "all_reduce"
    if "gemm" in lowered or "nvjet" in lowered or "gemv" in lowered or "cutlass" in lowered or "matmul" in lowered:
        return "gemm"
    if "attention" in lowered or "_decode_kernel" in lowered:
        return "attention"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="dummy:llama-8b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--compile-decode", default="off")
    p.add_argument("--all-reduce", default="auto")
    args = p.parse_args()

    import torch

    from engine.sequence import SamplingParams, Sequence
    from load_tests.gpu_bench import PROMPT_LEN, random_prompts
    from load_tests.tp_bench import engine_settings
    from server.runtime import Engines

    built = Engines.build(engine_settings(args, max_num_seqs=8, kv_cache_tokens=8192))
    engine = built.engine
    assert engine is not None
    runner = engine.runner
    seq = Sequence(
        prompt_ids=random_prompts(1, PROMPT_LEN, runner.model.args.vocab_size, seed=2)[0], params=SamplingParams()
    )
    engine.blocks.allocate(seq)

    def step() -> float:
        t0 = time.perf_counter()
        token = runner.run([seq])[0]
        seq.output_ids.append(token)
        seq.num_computed = seq.num_tokens - 1
        engine.blocks.allocate(seq)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(32):  # the prefill, then warm steps
        step()
    host_ms = [step() for _ in range(64)]
    marks: list[float] = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():  # on CPU (a smoke run) only the host side is seen
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(STEPS):
            with torch.profiler.record_function(f"decode_step_{i}"):
                marks.append(step())
    trace = args.out / "trace_rank0.json"
    args.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted(
        (e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"]
    )  # microseconds
    steps = sorted(
        (e for e in events if e.get("name", "").startswith("decode_step_") and e.get("cat") == "user_annotation"),
        key=lambda e: e["ts"],
    )
    per_step = []
    for s, nxt in zip(steps, [*steps[1:], None], strict=True):
        end = nxt["ts"] if nxt is not None else float("inf")
        ks = [k for k in kernels if s["ts"] <= k["ts"] < end]
        if not ks:
            continue
        by_kind: dict[str, float] = {}
        for k in ks:
            by_kind[kernel_kind(k["name"])] = by_kind.get(kernel_kind(k["name"]), 0.0) + k["dur"]
        reduces = [k["dur"] for k in ks if kernel_kind(k["name"]) == "all_reduce"]
        per_step.append(
            {
                "host_ms": round(s["dur"] / 1e3, 3),
                "first_kernel_after_step_start_us": round(ks[0]["ts"] - s["ts"], 1),
                "gpu_span_us": round(ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"], 1),
                "kernels": len(ks),
                "kernel_us_by_kind": {k: round(v, 1) for k, v in by_kind.items()},
                "all_reduces": len(reduces),
                "first_all_reduce_us": reduces[0] if reduces else None,
                "other_all_reduces_us_median": statistics.median(reduces[1:]) if len(reduces) > 1 else None,
                "other_all_reduces_us_max": max(reduces[1:]) if len(reduces) > 1 else None,
            }
        )
    names: dict[str, list[float]] = {}
    for k in kernels:
        names.setdefault(k["name"][:120], []).append(k["dur"])
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "model": args.model,
        "tp": args.tp,
        "compiled": runner.decode.compiled,
        "all_reduce": runner.model.layers[0].mlp.down_proj.all_reduce.describe() if args.tp > 1 else None,
        "step_ms_p50": statistics.median(host_ms),
        "profiled_step_ms_p50": statistics.median(marks),
        "per_step": per_step,
        "kernels_by_name": sorted(
            (
                {"name": n, "count": len(d), "us_total": round(sum(d), 1), "us_median": statistics.median(d)}
                for n, d in names.items()
            ),
            key=lambda r: -r["us_total"],
        )[:30],
    }
    trace.unlink()  # large; the summary above keeps what is read from it
    (args.out / f"tp_timeline_tp{args.tp}.json").write_text(json.dumps(result, indent=1))
    summary = {k: result[k] for k in ("model", "tp", "compiled", "step_ms_p50", "profiled_step_ms_p50")}
    print(json.dumps(summary))
    for row in per_step[:6]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
