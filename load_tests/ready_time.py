"""Seconds from starting ``python -m server`` to ``/ready``: from the raw models (startup calibration and
compression, today's default) against compressed checkpoints (``python -m models.compress``), in one run.

Starts measured, each in a fresh server process:

- ``raw-cold``: raw models, empty cache dir: GGUF conversion, calibration, compression, fidelity check
  (a new replica with nothing cached);
- ``raw-calibrate``: raw models, the converted GGUF cached but no compression cache (``--no-compress-cache``:
  every start calibrates, as with any setting or model the cache has not seen);
- ``raw-cached``: raw models, everything cached (a restart on the same cache volume);
- ``checkpoint``: the checkpoints, empty cache dir (a new replica reading the shared checkpoint volume).

    HF_HUB_OFFLINE=1 python -m load_tests.ready_time --out load_tests/results/ready_time/cpu.json
    # on a GPU host (dummy weights of the 1.7B architecture; CUDA graphs captured before /ready); without the
    # embedded model packages, pass tokenizers: --tokenizer DIR and a --cls-model HF dir (load_tests/gpu_bench.py
    # dummy_encoder_dir makes one from a tokenizer dir)
    HF_HUB_OFFLINE=1 python -m load_tests.ready_time --gen-model dummy:smollm2-1.7b --cls-model dummy:minilm-l6 \
        --device cuda --out load_tests/results/ready_time/h200.json

Not a test: minutes of work per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx

from load_tests.cpu_bench import machine


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_ready(
    args: list[str],
    env: dict[str, str],
    timeout: float,
    cwd: Path | None = None,
    on_ready: Callable[[subprocess.Popen], None] | None = None,
) -> tuple[float, dict]:
    """Starts the server with ``args`` (from the source tree ``cwd``, default this one); returns (seconds until
    /ready answered 200, /info); ``on_ready`` sees the process as soon as it is ready; stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            seconds = wait_ready(proc, url, start, timeout)
        except RuntimeError as exc:
            if proc.poll() is None:  # not ready in time
                raise
            raise RuntimeError(f"{exc}: {proc.stderr.read()[-3000:]}") from None
        if on_ready is not None:
            on_ready(proc)
        return seconds, httpx.get(f"{url}/info", timeout=5).json()
    finally:
        stop_server(proc)


def wait_ready(proc: subprocess.Popen, url: str, start: float, timeout: float, what: str = "server") -> float:  # type: ignore[type-arg]
    """Seconds from ``start`` (``time.perf_counter``) until the server ``proc`` at ``url`` answers /ready with
    200; RuntimeError naming ``what`` if it exits first or is not ready ``timeout`` seconds after ``start``."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{what} not ready within {timeout} s")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> None:  # type: ignore[type-arg]
    """SIGTERM (the server drains), then SIGKILL after ``timeout`` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def compress(
    task: str, model: str, out: Path, device: str, cache: Path, env: dict[str, str], extra: list[str]
) -> float:
    """Writes one checkpoint with the CLI (no compression cache: the full offline stage); its seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "models.compress", "--task", task, "--model", model, "--out", str(out)]
    cmd += ["--device", device, "--cache-dir", str(cache), "--no-compress-cache", *extra]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gen-model", default="default")
    p.add_argument("--cls-model", default="default")
    p.add_argument("--tokenizer", help="generation tokenizer dir (dummy models on a host without the embedded ones)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="starts per scenario (raw-cold: one)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("server_args", nargs="*", help="more server flags, after --")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ready-time-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = ["--device", args.device, *args.server_args]
    tokenizer = ["--tokenizer", args.tokenizer] if args.tokenizer else []
    raw = ["--gen-model", args.gen_model, "--cls-model", args.cls_model, *tokenizer, *base]
    results: dict[str, list[float]] = {}
    infos: dict[str, dict] = {}

    def measure(name: str, server_args: list[str], cache: Path, fresh_cache: bool, repeats: int) -> None:
        for i in range(repeats):
            if fresh_cache:
                shutil.rmtree(cache, ignore_errors=True)
            seconds, info = time_to_ready(server_args, {**env, "LLM_CACHE_DIR": str(cache)}, args.timeout)
            results.setdefault(name, []).append(round(seconds, 2))
            infos[name] = info
            print(f"{name} #{i + 1}: {seconds:.2f} s to /ready", flush=True)

    try:
        shared = work / "cache"  # conversions (and, for raw-cached, compressed weights) persist here
        measure("raw-cold", raw, shared, fresh_cache=True, repeats=1)
        measure("raw-calibrate", [*raw, "--no-compress-cache"], shared, fresh_cache=False, repeats=args.repeats)
        measure("raw-cached", raw, shared, fresh_cache=False, repeats=args.repeats)
        offline = {
            "generate": compress("generate", args.gen_model, work / "ckpt-gen", args.device, shared, env, tokenizer),
            "classify": compress("classify", args.cls_model, work / "ckpt-cls", args.device, shared, env, []),
        }
        print(f"offline compression: {offline}", flush=True)
        ckpt = ["--gen-model", str(work / "ckpt-gen"), "--cls-model", str(work / "ckpt-cls"), *base]
        measure("checkpoint", ckpt, work / "empty-cache", fresh_cache=True, repeats=args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {name: {"median_s": statistics.median(v), "runs_s": v} for name, v in results.items()}
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine() if args.device == "cpu" else platform.node(),
        "device": args.device,
        "gen_model": args.gen_model,
        "cls_model": args.cls_model,
        "ready_seconds": summary,
        "offline_compression_seconds": {k: round(v, 2) for k, v in offline.items()},
        "server_load_seconds": {
            name: {m["task"]: m["load_seconds"] for m in info["models"]} for name, info in infos.items()
        },
        "checkpoint_reports": {m["task"]: m["compression"] for m in infos["checkpoint"]["models"]},
    }
    if args.device == "cuda":
        import torch

        record["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
