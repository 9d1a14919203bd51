"""Seconds from a server's ``/ready`` to every decode bucket compiled (background compiling, the CPU default),
for two source trees started in turn on one inductor cache: a restart on a warm cache is what changed
(engine/decode_compiler.py CompiledMarks), a first start on an empty cache should not have.

    git archive <before> | tar -x -C /tmp/before; git archive <after> | tar -x -C /tmp/after
    HF_HUB_OFFLINE=1 nice -n 5 python -m load_tests.compile_restart --tree before=/tmp/before \\
        --tree after=/tmp/after --starts after:empty,before,after,after,before --out .../results.json

Each start names a tree and, with ``:empty``, a fresh inductor cache (which later starts then share);
only one server runs at a time. Trees are frozen copies: the marks' key hashes the engine's sources, so a
tree edited between starts would not find its marks. After ``/ready``, a greedy ``--tokens`` stream
through ``/generate`` every ``--interval`` seconds (tokens/s between its first and last event as this
client reads them, the seconds to the first event, the longest gap between two) with /info's compile
progress, until every bucket is compiled and ``--after`` more rounds. The server's log (beside ``--out``)
holds each bucket's load time ("loaded here in"). Not a test: minutes per start, never run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from load_tests.cpu_bench import machine
from load_tests.cpu_startup import PROMPT, stream_rate
from load_tests.ready_time import free_port, stop_server, wait_ready


def start(name: str, tree: Path, cache: Path, args: argparse.Namespace, log_path: Path) -> dict[str, object]:
    """One server from ``tree`` on the inductor cache ``cache``: /ready, rounds until compiled, stopped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(LLM_COMPILE_DECODE="auto", TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONPATH=str(tree))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(port), "--log-level", "info"],
            cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        rows: list[dict[str, object]] = []
        result: dict[str, object] = {"tree": name, "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
        try:
            seconds = wait_ready(proc, url, began, args.timeout, f"{name} (log {log_path})")
            result["seconds_to_ready"] = round(seconds, 1)
            ready = time.perf_counter()
            after = 0
            while time.perf_counter() - ready < args.limit and after < args.after:
                round_start = time.perf_counter()
                progress = httpx.get(f"{url}/info", timeout=30).json().get("decode_compile") or {}
                ours = stream_rate(url, PROMPT, args.tokens)
                row = {
                    "since_ready_s": round(round_start - ready, 1),
                    "compile_state": progress.get("state"),
                    "compiled_batches": [c["batch"] for c in progress.get("compiled", [])],
                    **{f"ours_{k}": v for k, v in ours.items()},
                    "load_average_1m": round(os.getloadavg()[0], 2),
                }
                rows.append(row)
                print(name, row, flush=True)
                if row["compile_state"] in ("done", "failed"):
                    after += 1
                time.sleep(max(0.0, round_start + args.interval - time.perf_counter()))
            progress = httpx.get(f"{url}/info", timeout=30).json().get("decode_compile") or {}
            seconds = {c["batch"]: c["seconds"] for c in progress.get("compiled", [])}
            result.update(
                state=progress.get("state"),
                batch1_compiled_s=seconds.get(1),
                all_compiled_s=max(seconds.values()) if progress.get("state") == "done" else None,
                compiled_s=seconds,
                rows=rows,
            )
        finally:
            stop_server(proc)
    lines = log_path.read_text(errors="replace").splitlines()
    result["log"] = [ln[-200:] for ln in lines if "compiled after" in ln or "buckets in the inductor cache" in ln]
    print(name, {k: v for k, v in result.items() if k not in ("rows", "log")}, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, help="NAME=DIR: a source tree to start servers from")
    ap.add_argument("--starts", required=True, help="comma-separated NAME or NAME:empty (a fresh inductor cache)")
    ap.add_argument("--cache", type=Path, help="the inductor cache the starts share (default: a temporary one)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--interval", type=float, default=4, help="seconds from one stream's start to the next")
    ap.add_argument("--after", type=int, default=1, help="rounds once compiling is done")
    ap.add_argument("--limit", type=float, default=600, help="seconds after /ready to wait for compiling")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for /ready")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.tree)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="inductor-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        for i, spec in enumerate(args.starts.split(",")):
            name, _, suffix = spec.partition(":")
            if suffix not in ("", "empty"):
                ap.error(f"--starts: {spec!r}: the only suffix is ':empty'")
            fresh = suffix == "empty"
            if fresh:  # a fresh directory: later starts share the cache this one fills
                cache = Path(tempfile.mkdtemp(prefix="cache-", dir=tmp))
            log_path = args.out.parent / f"{i}_{name}{'_empty' if fresh else ''}.log"
            runs.append({"cache": "empty" if fresh else "warm", **start(name, trees[name], cache, args, log_path)})
    m = machine()
    out = {
        "command": "python -m load_tests.compile_restart " + " ".join(sys.argv[1:]),
        "trees": {name: str(path) for name, path in trees.items()},
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: v for k, v in m.items() if k != "lscpu"},
        "runs": runs,
    }
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
