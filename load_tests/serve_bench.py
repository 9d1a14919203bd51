"""HTTP serving benchmark (issue 11): the server's process layouts side by side in one run, driven by
load generators that are not the bottleneck, against the engine's own throughput in process.

For each server configuration (one process with the engines on threads, or engine core + N API servers):
  * /classify, one distinct text per request (response cache off), wrk at 1 and 256 connections;
  * /generate non-streamed, 128 new tokens, wrk at 256 connections (tokens/s from the server's counter);
  * /generate streamed at 256 concurrent streams: time to first token from raw-socket clients spread
    over several processes.
Then, once, the engine level: AsyncLLM in this process at 256 concurrent requests of the same shape.
The models are the dummy 135M generator and a MiniLM-shaped encoder (random weights, tokenizers carried).

Needs CUDA and wrk (Debian's package, unpacked)::

    python -m load_tests.serve_bench --tokenizer TOK --encoder-tokenizer MINILM_TOK --wrk WRK_ROOT --out DIR

With ``--embedded CACHE_DIR`` it serves the embedded models with each checkout's default settings instead
(the CPU A/B: ``--configs before,after --rounds 2 --concurrency 8 --skip-engine``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from load_tests.ready_time import stop_server

NEW_TOKENS = 128
PROMPT = " ".join(["Customer asks about the delivery of an order and a refund for a damaged item."] * 8)
CLASSIFY_LUA = """
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
request = function()
  local body = string.format('{"inputs": "message %d: my order %d has not arrived and I want my money back",'
    .. ' "labels": ["billing", "shipping", "account", "technical support"]}', math.random(1, 1e9), math.random(1, 1e6))
  return wrk.format("POST", "/classify", {["Content-Type"] = "application/json"}, body)
end
"""
HEALTH_LUA = 'wrk.method = "GET"'
GENERATE_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt": "%s", "max_tokens": %d}'
"""
SERVER_ENV = {
    "LLM_GEN_MODEL": "dummy:smollm2-135m",
    "LLM_MAX_NUM_SEQS": "256",
    "LLM_MAX_QUEUED_REQUESTS": "1024",
    "LLM_MAX_CONCURRENT_STREAMS": "1024",
    "LLM_KV_CACHE_TOKENS": "131072",
    "LLM_CLS_MAX_BATCH_SIZE": "256",
    "LLM_CLS_MAX_BATCH_TOKENS": "16384",
    "LLM_CLS_MAX_QUEUED_INPUTS": "8192",
    "LLM_CLS_CACHE_SIZE": "0",
    "LLM_LOG_LEVEL": "warning",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def start_server(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``env["CODE_DIR"]``: run the server from another checkout (the code before a change);
    ``env["FAST_SITE"]``: a site dir with httptools and uvloop (absent: uvicorn uses h11 and asyncio)."""
    env = dict(env)
    code = str(Path(env.pop("CODE_DIR", ".")).resolve())
    fast = env.pop("FAST_SITE", None)
    cache = env.pop("CACHE_DIR", None) or tempfile.mkdtemp()
    server_env = SERVER_ENV if env.pop("DEFAULTS", None) is None else {"LLM_CLS_CACHE_SIZE": "0"}
    full = {**server_env, **os.environ, **env, "LLM_PORT": str(port), "LLM_CACHE_DIR": cache}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (code, fast, full.get("PYTHONPATH", "")) if p)
    # The checkout goes first on sys.path whatever the interpreter puts there; the log's first line
    # says which code answered.
    boot = (
        "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); import server; "
        "print('server code:', server.__file__, file=sys.stderr, flush=True); "
        "runpy.run_module('server', run_name='__main__', alter_sys=True)"
    )
    stdout = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-c", boot, code], env=full, stdout=stdout, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready in 300 s")


def counter(port: int, name: str, text: str | None = None) -> float:
    """A metric's value summed over its label sets, from ``text`` (a scrape) or a new scrape of the server."""
    if text is None:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


STEP_BOUNDS = (0.05, 0.1, 0.25)  # engine steps longer than these are counted (they are histogram bucket bounds)


def engine_steps(port: int) -> dict[str, dict[str, float]]:
    """The engine's step-time histogram by phase (count, sum, steps over each of ``STEP_BOUNDS``) and its
    preemptions, summed over the server's processes: subtract two of these to see what a load did."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    for phase in ("prefill", "decode"):
        sel = rf'\{{[^}}]*phase="{phase}"[^}}]*'
        count = sum(float(v) for v in re.findall(rf"^llm_engine_step_seconds_count{sel}\}} (\S+)$", text, re.M))
        total = sum(float(v) for v in re.findall(rf"^llm_engine_step_seconds_sum{sel}\}} (\S+)$", text, re.M))
        row = {"steps": count, "seconds": total}
        for bound in STEP_BOUNDS:
            labels = rf'(?=[^}}]*phase="{phase}")(?=[^}}]*le="{bound}")[^}}]*'
            within = rf"^llm_engine_step_seconds_bucket\{{{labels}\}} (\S+)$"
            row[f"over_{int(bound * 1e3)}ms"] = count - sum(float(v) for v in re.findall(within, text, re.M))
        out[phase] = row
    out["preemptions"] = {"total": counter(port, "llm_preemptions_total", text)}
    return out


def wrk(root: Path, port: int, path: str, lua: str, connections: int, seconds: int, threads: int) -> dict[str, Any]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(lua)
    lib = next(root.rglob("libluajit*.so*")).parent
    cmd = [str(root / "usr/bin/wrk"), f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s"]
    cmd += ["--latency", "--timeout", "30s", "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(lib)}).stdout

    def ms(token: str) -> float:
        value, unit = float(re.match(r"[\d.]+", token).group()), re.sub(r"[\d.]+", "", token)  # type: ignore[union-attr]
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    pcts = {f"p{p}": ms(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)$", out, re.M)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {
        "connections": connections,
        "seconds": seconds,
        "requests_per_s": float(rps.group(1)) if rps else None,
        "requests": int(total.group(1)) if total else None,
        "latency_ms": pcts,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else None,
        "driver": f"wrk -t{min(threads, connections)} -c{connections}",
    }


STALL_MS = 50.0  # a gap between two events of one stream this long is reported with when it happened


LAG_TICK_S = 0.005  # the stream client's event-loop lag is sampled at this interval


async def _streams(port: int, concurrency: int, seconds: float, new_tokens: int) -> dict[str, Any]:
    """Of back-to-back streamed requests on ``concurrency`` raw connections: TTFTs and gaps between consecutive
    events of a stream (ms), when (wall-clock seconds) each stall (a gap over ``STALL_MS``) ended, and the
    client's own share in them: its event loop's lag (ms late for a ``LAG_TICK_S`` tick) and its CPU seconds.
    A client whose loop lags as long as the stalls, or that uses a whole core, is what the stalls measure."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": new_tokens, "stream": True}).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    ttfts: list[float] = []
    gaps: list[float] = []
    stalls: list[float] = []
    lags: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    end = start + seconds

    async def one() -> None:
        while time.perf_counter() < end:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.perf_counter()
            writer.write(head + body)
            last = None
            while line := await reader.readline():
                if line.startswith(b"data: "):
                    now = time.perf_counter()
                    if last is None:
                        ttfts.append((now - t0) * 1e3)
                    else:
                        gaps.append((now - last) * 1e3)
                        if gaps[-1] > STALL_MS:
                            stalls.append(time.time())
                    last = now
            writer.close()

    async def lag() -> None:
        while time.perf_counter() < end:
            tick = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            lags.append((time.perf_counter() - tick - LAG_TICK_S) * 1e3)

    await asyncio.gather(lag(), *(one() for _ in range(concurrency)))
    cpu_share = (time.process_time() - cpu) / (time.perf_counter() - start)
    return {"ttfts": ttfts, "gaps": gaps, "stalls": stalls, "lags": lags, "cpu_share": cpu_share}


def _stream_worker(port: int, concurrency: int, seconds: float, new_tokens: int, out: Any) -> None:
    out.put(asyncio.run(_streams(port, concurrency, seconds, new_tokens)))


def streamed(port: int, concurrency: int, seconds: float, processes: int, new_tokens: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    before, steps_before = counter(port, "llm_generated_tokens_total"), engine_steps(port)
    t0 = time.perf_counter()
    procs = [
        ctx.Process(target=_stream_worker, args=(port, concurrency // processes, seconds, new_tokens, q))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    parts = [q.get() for _ in procs]
    ttfts = sorted(t for part in parts for t in part["ttfts"])
    gaps = sorted(g for part in parts for g in part["gaps"])
    stalls = sorted(t for part in parts for t in part["stalls"])
    lags = sorted(lag for part in parts for lag in part["lags"])
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    tokens = counter(port, "llm_generated_tokens_total") - before
    steps_after = engine_steps(port)
    steps = {
        kind: {k: round(v - steps_before[kind][k], 3) for k, v in row.items()} for kind, row in steps_after.items()
    }
    pick = lambda xs, q: xs[min(int(q * len(xs)), len(xs) - 1)] if xs else None  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": len(ttfts),
        "tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": pick(ttfts, 0.5), "p99": pick(ttfts, 0.99)},
        "inter_event_ms": {"p50": pick(gaps, 0.5), "p99": pick(gaps, 0.99), "max": gaps[-1] if gaps else None},
        # when the stalls ended, in seconds from the first one: clustered (one event for all streams) or not
        "stalls_s": [round(t - stalls[0], 3) for t in stalls] if stalls else [],
        # the load generator's own delays: its event loops' lag and the busiest client process's share of a core
        "client_loop_lag_ms": {"p50": pick(lags, 0.5), "p99": pick(lags, 0.99), "max": lags[-1] if lags else None},
        "client_cpu_share_max": round(max(part["cpu_share"] for part in parts), 2),
        # the engine's side meanwhile: its steps by phase (how many ran long) and its preemptions
        "engine_steps": steps,
        "driver": f"{processes} processes x {concurrency // processes} raw-socket streams",
    }


def _server_pids(root: int) -> list[int]:
    """The server's process and its children (engine cores, API servers)."""
    pids = [root]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            pids.append(int(stat.parent.name))
    return pids


def _summarize(raw: str, top: int = 12) -> dict[str, Any]:
    """py-spy's collapsed stacks as the frames holding the most samples, by self and by inclusive time."""
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    share = lambda d: {k[:140]: round(v / total, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]}  # noqa: E731
    return {"samples": total, "self": share(leaf), "inclusive": share(inclusive)}


def profile_during(pyspy: str | None, root: int, seconds: int) -> Any:
    """Starts py-spy on every server process after a short delay; call the result to collect summaries."""
    if pyspy is None:
        return lambda: None
    time.sleep(1.0)
    runs = []
    for pid in _server_pids(root):
        out = Path(tempfile.mkstemp(suffix=".txt")[1])
        cmd = [pyspy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "--format", "raw", "-o", str(out)]
        runs.append((pid, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))

    def collect() -> dict[str, Any]:
        result = {}
        for pid, out, proc in runs:
            proc.wait()
            result[str(pid)] = _summarize(out.read_text()) if out.exists() else {}
        return result

    return collect


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU time (user + system) so far of the server's processes, summed by role: the API servers, the engine
    cores, and the rest (the supervisor; a one-process server's everything)."""
    tick = os.sysconf("SC_CLK_TCK")
    by_role: dict[str, float] = {}
    for pid in _server_pids(root):
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        role = "api_servers" if name.startswith("api-server") else "cores" if name.startswith("engine-core") else "rest"
        by_role[role] = by_role.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return by_role


def loaded(run: Any, args: argparse.Namespace, root: int) -> tuple[Any, Any]:
    """``run()`` under load, with py-spy over the server's processes meanwhile when asked for. A wrk result
    gains the server's CPU time per request by role (how much host work a request costs, whatever the
    host's other load)."""
    import threading

    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = run()
        except BaseException as exc:  # raised again below, on the caller's thread
            box["error"] = exc

    before = cpu_seconds(root)
    worker = threading.Thread(target=work)
    worker.start()
    collect = profile_during(args.py_spy, root, max(args.seconds - 3, 2))
    worker.join()
    if "error" in box:
        raise box["error"]
    result = box["result"]
    spent = {role: seconds - before.get(role, 0.0) for role, seconds in cpu_seconds(root).items()}
    if isinstance(result, dict) and result.get("requests"):
        result["cpu_ms_per_request"] = {role: round(1e3 * t / result["requests"], 3) for role, t in spent.items()}
    return result, collect()


def serve(name: str, env: dict[str, str], args: argparse.Namespace, port: int) -> dict[str, Any]:
    log(f"{name}: starting ({env})")
    log_path = Path(tempfile.mkstemp(suffix=".log")[1])
    proc = start_server(env, port, log_path)
    out: dict[str, Any] = {"env": env, "profiles": {}}
    try:
        d, c = args.seconds, args.concurrency
        phases = args.phases.split(",")
        if "health" in phases:
            out[f"health_c{c}"], _ = loaded(
                lambda: wrk(args.wrk, port, "/health", HEALTH_LUA, c, d, args.wrk_threads), args, proc.pid
            )
        if "classify" in phases:
            out["classify_c1"], out["profiles"]["classify_c1"] = loaded(
                lambda: wrk(args.wrk, port, "/classify", CLASSIFY_LUA, 1, d, 1), args, proc.pid
            )
            out[f"classify_c{c}"], out["profiles"][f"classify_c{c}"] = loaded(
                lambda: wrk(args.wrk, port, "/classify", CLASSIFY_LUA, c, d, args.wrk_threads), args, proc.pid
            )
            log(f"  classify: c1 {out['classify_c1']}, c{c} {out[f'classify_c{c}']}")
        if "generate" in phases:
            before = counter(port, "llm_generated_tokens_total")
            t0 = time.perf_counter()
            lua = GENERATE_LUA % (PROMPT, args.new_tokens)
            gen, out["profiles"][f"generate_c{c}"] = loaded(
                lambda: wrk(args.wrk, port, "/generate", lua, c, d, args.wrk_threads), args, proc.pid
            )
            gen["tokens_per_s"] = (counter(port, "llm_generated_tokens_total") - before) / (time.perf_counter() - t0)
            out[f"generate_c{c}"] = gen
            log(f"  generate c{c}: {gen}")
        if "stream" in phases:
            out[f"stream_c{c}"], out["profiles"][f"stream_c{c}"] = loaded(
                lambda: streamed(port, c, d, args.stream_processes, args.new_tokens), args, proc.pid
            )
            log(f"  streamed c{c}: {out[f'stream_c{c}']}")
        if args.mixed:
            out["mixed"] = mixed(args, port, args.mixed)
            log(f"  mixed: {out['mixed']}")
    finally:
        stop_server(proc)
        text = log_path.read_text(errors="replace")
        out["server_log_head"], out["server_log_tail"] = text[:300], text[-2000:]
    return out


def mixed(args: argparse.Namespace, port: int, c: int) -> dict[str, Any]:
    """What generation and classification do to each other on one device: /classify at ``c`` clients and
    ``c`` streamed generations, each alone and then both at once."""
    import threading

    d = args.seconds
    classify = lambda: wrk(args.wrk, port, "/classify", CLASSIFY_LUA, c, d, args.wrk_threads)  # noqa: E731
    stream = lambda: streamed(port, c, d, args.stream_processes, args.new_tokens)  # noqa: E731
    out: dict[str, Any] = {"classify_alone": classify(), "stream_alone": stream()}
    box: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: box.update(stream=stream()))
    worker.start()
    out["classify_with_streams"] = classify()
    worker.join()
    out["stream_with_classify"] = box["stream"]
    return out


def engine_level(tokenizer: Path) -> dict[str, Any]:
    """The same requests as the HTTP runs (prompt, 128 new tokens, 256 at a time) through AsyncLLM in process."""
    import torch

    from engine.llm_engine import AsyncLLM, LLMEngine
    from load_tests import gpu_bench
    from models.llama import Llama
    from models.loader import load_causal_lm

    loaded = load_causal_lm("dummy:smollm2-135m", Path(tempfile.mkdtemp()), torch.bfloat16, str(tokenizer))
    model = Llama.from_hf(loaded.config, loaded.state_dict).to("cuda")
    engine = LLMEngine(model, loaded.tokenizer, torch.device("cuda"), torch.bfloat16, gpu_bench.engine_config())
    prompt = loaded.tokenizer(PROMPT).input_ids
    llm = AsyncLLM(engine)
    llm.start()
    try:
        asyncio.run(gpu_bench._engine_level(llm, [prompt] * 32, 32))  # warm-up
        return asyncio.run(gpu_bench._engine_level(llm, [prompt] * 1024, 256))
    finally:
        llm.stop()


CONFIGS = {
    # Main before issue 11 (79dbe9d), unpacked by the caller: ``git archive 79dbe9d server engine models data``.
    "before-h11": {"CODE_DIR": ".bench/before", "SLOW_HTTP": "1"},
    "before": {"CODE_DIR": ".bench/before"},
    "one-process": {"LLM_ENGINE_CORE": "thread", "LLM_CLS_MAX_WAIT_MS": "5"},
    "after": {},  # this checkout with its own defaults
    "one-process-nowait": {"LLM_ENGINE_CORE": "thread", "LLM_CLS_MAX_WAIT_MS": "0"},
    "core+1api": {"LLM_ENGINE_CORE": "process", "LLM_API_SERVERS": "1", "LLM_CLS_MAX_WAIT_MS": "0"},
    "core+4api": {"LLM_ENGINE_CORE": "process", "LLM_API_SERVERS": "4", "LLM_CLS_MAX_WAIT_MS": "0"},
    "core+8api": {"LLM_ENGINE_CORE": "process", "LLM_API_SERVERS": "8", "LLM_CLS_MAX_WAIT_MS": "0"},
    "dp2+8api": {"LLM_ENGINE_CORE": "process", "LLM_API_SERVERS": "8", "LLM_DATA_PARALLEL_SIZE": "2"},
    "dp2+16api": {"LLM_ENGINE_CORE": "process", "LLM_API_SERVERS": "16", "LLM_DATA_PARALLEL_SIZE": "2"},
    "12api": {"LLM_API_SERVERS": "12"},  # this checkout, one GPU, more API servers than its default
    "dp2": {"LLM_DATA_PARALLEL_SIZE": "2"},  # this checkout's defaults on two GPUs
    "prefill8k": {"LLM_MAX_BATCHED_TOKENS": "8192"},  # this checkout, larger prefill steps than its default
    "prefill16k": {"LLM_MAX_BATCHED_TOKENS": "16384"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, help="SmolLM2 tokenizer dir (dummy models)")
    p.add_argument("--encoder-tokenizer", type=Path, help="MiniLM tokenizer dir (dummy models)")
    p.add_argument("--wrk", type=Path, required=True, help="root of the unpacked wrk and libluajit packages")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--before-dir", type=Path, help="where 'before' runs from (default .bench/before)")
    p.add_argument("--after-dir", type=Path, help="where 'after' runs from (default this checkout)")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--wrk-threads", type=int, default=4)
    p.add_argument("--stream-processes", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--fast-site", help="site dir holding httptools and uvloop (configs marked so run without it)")
    p.add_argument("--py-spy", help="py-spy binary: profile the server's processes under load")
    p.add_argument("--concurrency", type=int, default=256, help="clients of the loaded runs")
    p.add_argument(
        "--mixed", type=int, default=0, metavar="C", help="classify and stream at C clients each, alone, then together"
    )
    p.add_argument("--phases", default="health,classify,generate,stream", help="which loads to run, in this order")
    p.add_argument("--rounds", type=int, default=1, help="run the configurations this many times, interleaved")
    p.add_argument(
        "--embedded",
        type=Path,
        metavar="CACHE_DIR",
        help="serve the embedded models with the server's default settings (a CPU A/B), reusing CACHE_DIR's "
        "converted and compressed models",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from load_tests.gpu_bench import dummy_encoder_dir

    if args.embedded is not None:
        base = {"DEFAULTS": "1", "CACHE_DIR": str(args.embedded)}
    else:
        base = {"LLM_TOKENIZER": str(args.tokenizer), "LLM_CLS_MODEL": str(dummy_encoder_dir(args.encoder_tokenizer))}
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(sys.argv),
        "servers": {},
    }
    try:
        import torch

        results["host"]["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # the HTTP part still runs where torch cannot see the GPU
        results["host"]["gpu"] = f"unknown ({exc})"
    names = args.configs.split(",")
    for i, (round_, name) in enumerate((r, n) for r in range(args.rounds) for n in names):
        key = name if args.rounds == 1 else f"{name}#{round_ + 1}"
        try:
            env = {**base, **CONFIGS[name]}
            if "CODE_DIR" in env and args.before_dir is not None:
                env["CODE_DIR"] = str(args.before_dir)
            if name == "after" and args.after_dir is not None:
                env["CODE_DIR"] = str(args.after_dir)
            if args.fast_site and env.pop("SLOW_HTTP", None) is None:
                env["FAST_SITE"] = args.fast_site
            results["servers"][key] = serve(key, env, args, 8900 + i)
        except Exception as exc:
            log(f"{key} failed: {type(exc).__name__}: {exc}")
            results["servers"][key] = {"error": f"{type(exc).__name__}: {exc}"}
        (args.out / "serve_bench.json").write_text(json.dumps(results, indent=1))
    if not args.skip_engine:
        results["engine_level_c256"] = engine_level(args.tokenizer)
        log(f"engine level: {results['engine_level_c256']}")
    (args.out / "serve_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
