"""Probe: can the server load a compiled decode step without dynamo's trace? Background compiling loads each of
the two graphs (batch 1; every larger batch) into the server by compiling it again from the warm inductor
cache: dynamo's trace, 6-16 s per graph on a 2-vCPU box, streams slowed meanwhile
(load_tests/results/cpu_vs_llamacpp/compile_process/). torch's AOT precompile
(``torch._dynamo.config.enable_aot_compile``, ``compiled.aot_compile``, ``torch.compiler.load_compiled_function``;
experimental in torch 2.13) saves the traced bytecode and the inductor code together and loads them with no trace.

Each phase runs in a fresh process, on the server's engine (Engines.build, CPU defaults) and one inductor cache:

    HF_HUB_OFFLINE=1 nice -n 5 python -m load_tests.aot_precompile_probe \\
        --out load_tests/results/cpu_vs_llamacpp/compile_process/aot_precompile/results.json

``save`` (as the compiler child would): AOT-compiles the step at batch 1 and at batch 2 (rows dynamic), saves
both; ``load`` (as the server would): loads both, runs every batch and KV bucket against the eager step on
random rows (same greedy tokens, largest logit difference), then times steps; ``trace`` (today's load):
``DecodeGraphs._load`` of batch 1 and 2 on the same cache, then times steps through ``torch._dynamo.run``,
as the server serves. The guards are all skipped (``skip_all_guards_unsafe``): with module guards skipped
as the server does, some left still read the step's ``self`` and cannot be built at load; the server would
pick the graph by batch itself. Not a test: minutes of compiling.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timezone
from pathlib import Path

GRAPHS = {"batch1": 1, "rows_dynamic": 2}  # the two graphs, by the batch each is compiled at


def phase(mode: str, folder: Path) -> dict[str, object]:
    import torch

    torch._dynamo.config.enable_aot_compile = True  # before any torch.compile
    from engine import cuda_graphs
    from engine.cuda_graphs import DecodeGraphs
    from server.config import Settings
    from server.runtime import Engines

    Engines.build(Settings(enable_classify=False))
    decode = next(o for o in gc.get_objects() if isinstance(o, DecodeGraphs))
    with torch.inference_mode(False):
        inputs = torch.zeros_like(decode.inputs)
    out: dict[str, object] = {"mode": mode, "threads": torch.get_num_threads()}
    gen = torch.Generator().manual_seed(0)
    blocks = decode.kv_cache[0].shape[1] // decode.block_size  # (layers, slots, KV heads, head dim)

    def rows(batch: int, kv_len: int) -> tuple[torch.Tensor, ...]:
        """Random rows as the server stages them: token ids, positions below the KV bucket, block tables whose
        blocks no other position shares (nor another row, where the cache holds enough blocks)."""
        ids, positions, tables = (t.contiguous() for t in decode._inputs(batch, kv_len, 1, inputs))
        ids.random_(0, decode.model.args.vocab_size, generator=gen)
        positions.random_(0, kv_len, generator=gen)
        if tables.numel() < blocks:  # every block its row's own
            tables.copy_((torch.randperm(blocks - 1, generator=gen)[: tables.numel()] + 1).view_as(tables))
        else:  # more than the cache holds: each row's blocks its own, rows may share
            for row in tables:
                row.copy_(torch.randperm(blocks - 1, generator=gen)[: row.numel()] + 1)
        torch._dynamo.mark_dynamic(tables, 1)
        if batch > 1:
            for t in (ids, positions, tables):
                torch._dynamo.mark_dynamic(t, 0)
        return ids, positions, tables

    def step_ms(run: object, batch: int, n: int = 40) -> float:
        args = rows(batch, decode.kv_lens[1])
        run(*args)
        start = time.perf_counter()
        for _ in range(n):
            run(*args)
        return round((time.perf_counter() - start) / n * 1e3, 2)

    def check(run: object) -> None:
        """``run(batch, *rows)`` against the eager step at every batch and KV bucket."""
        checks = []
        for batch in decode.batch_sizes:
            for kv_len in decode.kv_lens:
                args = rows(batch, kv_len)
                (tokens, logits), (ref_tokens, ref_logits) = run(batch, *args), decode._step(*args)
                checks.append(
                    {
                        "batch": batch,
                        "kv_len": kv_len,
                        "same_tokens": bool(torch.equal(tokens, ref_tokens)),
                        "max_logit_diff": round(float((logits - ref_logits).abs().max()), 4),
                    }
                )
        out["checks_all_same_tokens"] = all(c["same_tokens"] for c in checks)
        out["checks_max_logit_diff"] = max(c["max_logit_diff"] for c in checks)
        out["checks"] = checks

    with torch.inference_mode():
        decode._step(*decode._inputs(1, decode.kv_lens[0], 1, inputs))  # one-time checks outside any trace
        if mode == "save":
            code = DecodeGraphs._step.__code__.replace()
            step = types.FunctionType(code, vars(cuda_graphs), "_step", DecodeGraphs._step.__defaults__)
            options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe, "compile_threads": 1}
            compiled = torch.compile(types.MethodType(step, decode), fullgraph=True, dynamic=False, options=options)
            for name, batch in GRAPHS.items():
                start = time.perf_counter()
                aot = compiled.aot_compile((rows(batch, decode.kv_lens[0]), {}))
                aot.save_compiled_function(str(folder / f"{name}.bin"))
                out[f"{name}_compile_and_save_s"] = round(time.perf_counter() - start, 2)
                out[f"{name}_bytes"] = (folder / f"{name}.bin").stat().st_size
        elif mode == "load":
            fns = {}
            for name in GRAPHS:
                start = time.perf_counter()
                with (folder / f"{name}.bin").open("rb") as f:
                    fns[name] = torch.compiler.load_compiled_function(f, f_globals=vars(cuda_graphs))
                out[f"{name}_load_s"] = round(time.perf_counter() - start, 2)
            check(lambda batch, *a: fns["batch1" if batch == 1 else "rows_dynamic"](decode, *a))
            for batch in (1, 16):
                fn = fns["batch1" if batch == 1 else "rows_dynamic"]
                out[f"step_ms_batch{batch}"] = step_ms(lambda *a, fn=fn: fn(decode, *a), batch)
                out[f"eager_step_ms_batch{batch}"] = step_ms(decode._step, batch)
        else:  # trace: today's load, then the server's serving call
            from torch._dynamo.utils import counters

            decode._make_compiled()
            for name, batch in GRAPHS.items():
                misses, start = counters["inductor"]["fxgraph_cache_miss"], time.perf_counter()
                decode._load(batch, 1, inputs)
                out[f"{name}_load_s"] = round(time.perf_counter() - start, 2)
                out[f"{name}_cache_misses"] = counters["inductor"]["fxgraph_cache_miss"] - misses
            check(lambda batch, *a: decode._serve(*a))
            for batch in (1, 16):
                out[f"step_ms_batch{batch}"] = step_ms(decode._serve, batch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="save,load,trace,trace", help="comma-separated, each in its own process")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase here
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        args.out.write_text(json.dumps(phase(args.phase, args.folder)))
        return
    from load_tests.cpu_bench import machine

    started = datetime.now(timezone.utc)
    results = []
    with tempfile.TemporaryDirectory(prefix="aot-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        for i, mode in enumerate(args.phases.split(",")):
            out = Path(tmp) / f"{i}.json"
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "load_tests.aot_precompile_probe", "--phase", mode, "--folder", tmp]
            subprocess.run([*cmd, "--out", str(out)], env=env, check=True)
            result = {**json.loads(out.read_text()), "process_s": round(time.perf_counter() - start, 1)}
            result["load_average_1m"] = round(os.getloadavg()[0], 2)
            print({k: v for k, v in result.items() if k != "checks"}, flush=True)
            results.append(result)
    m = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python -m load_tests.aot_precompile_probe " + " ".join(sys.argv[1:]),
                "started": started.isoformat(timespec="seconds"),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": {k: v for k, v in m.items() if k != "lscpu"},
                "phases": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
