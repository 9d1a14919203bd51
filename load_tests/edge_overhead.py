"""What the API server's edge costs a lone request, piece by piece (issue 11), on this checkout:

- ``middleware``: CPU per request of each of the server's HTTP middlewares (request id, metrics, body limit)
  around a trivial ASGI app, in process on uvloop (``time.process_time`` over many calls, the minimum of
  several repeats, the bare app's cost subtracted);
- ``head``: uvicorn (httptools, uvloop) serving a fixed 148-byte JSON to one wrk client, with the server's
  protocol as ``DrainingServer`` builds it (``header_deadline`` over ``head_joined``) and without
  ``head_joined``, windows interleaved: server CPU per request (``/proc``) and wrk's p50.

    python -m load_tests.edge_overhead middleware
    python -m load_tests.edge_overhead head --wrk .bench/wrk --rounds 10

Results: load_tests/results/serve/c1_local/README.md (session 4)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BODY = b'{"inputs": "message 1: my order 2 has not arrived", "labels": ["billing", "shipping"]}'
RESPONSE = (
    b'{"results":[{"label":"a","score":0.5821561217308044,"scores":[{"label":"a","score":0.5821561217308044},'
    b'{"label":"b","score":0.41784390807151794}]}]}'
)


async def trivial_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(RESPONSE)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": RESPONSE})


def middleware(repeats: int, calls: int) -> dict[str, float]:
    """Microseconds of CPU per request for each middleware alone and all three, over the bare app."""
    import uvloop

    from server.metrics import MetricsMiddleware
    from server.middleware import BodyLimitMiddleware
    from server.request_id import RequestIdMiddleware

    logging.getLogger("server.access").setLevel(logging.WARNING)  # as LLM_LOG_LEVEL=warning
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"86")]

    def build(which: str) -> Any:
        app: Any = trivial_app
        if "b" in which:
            app = BodyLimitMiddleware(app, 1 << 20, 30.0)
        if "m" in which:
            app = MetricsMiddleware(app)
        if "r" in which:
            app = RequestIdMiddleware(app)
        return app

    async def one(app: Any) -> None:
        messages = [{"type": "http.request", "body": BODY, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/classify", "headers": list(headers), "query_string": b""}
        await app(scope, receive, send)

    async def per_call(which: str) -> float:
        app = build(which)
        for _ in range(calls // 10):
            await one(app)
        start = time.process_time()
        for _ in range(calls):
            await one(app)
        return (time.process_time() - start) / calls * 1e6

    names = {"": "app", "r": "request_id", "m": "metrics", "b": "body_limit", "rmb": "all_three"}
    best = {which: min(uvloop.run(per_call(which)) for _ in range(repeats)) for which in names}
    return {names[w]: round(us - (best[""] if w else 0.0), 2) for w, us in best.items()}


def serve_head(joined: bool, port: int) -> None:
    import uvicorn
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    from server.draining import head_joined, header_deadline

    base = import_from_string(HTTP_PROTOCOLS["httptools"])
    protocol = header_deadline(head_joined(base) if joined else base, 30.0)
    uvicorn.run(trivial_app, port=port, http=protocol, loop="uvloop", log_level="warning", access_log=False)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def head(wrk_root: Path, rounds: int, seconds: int) -> dict[str, Any]:
    """Interleaved windows against two uvicorn servers, one with ``head_joined`` and one without."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(next(wrk_root.rglob("libluajit*.so*")).parent)}
    ports = {"plain": 8931, "joined": 8932}
    servers = {
        name: subprocess.Popen([sys.executable, "-m", "load_tests.edge_overhead", "_serve", name, str(port)])
        for name, port in ports.items()
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
    try:
        time.sleep(4)
        for r in range(rounds):
            for name in list(ports) if r % 2 == 0 else list(ports)[::-1]:
                before = cpu_seconds(servers[name].pid)
                cmd = [str(wrk_root / "usr/bin/wrk"), "-t1", "-c1", f"-d{seconds}s", "--latency"]
                out = subprocess.run(
                    [*cmd, f"http://127.0.0.1:{ports[name]}/"], capture_output=True, text=True, env=env
                )
                n = int(re.search(r"(\d+) requests in", out.stdout).group(1))  # type: ignore[union-attr]
                p50 = re.search(r"50%\s+([\d.]+)(us|ms)", out.stdout)
                assert p50 is not None
                runs[name].append(
                    {
                        "cpu_us": (cpu_seconds(servers[name].pid) - before) / n * 1e6,
                        "p50_us": float(p50.group(1)) * (1.0 if p50.group(2) == "us" else 1e3),
                        "requests": n,
                    }
                )
    finally:
        for server in servers.values():
            server.send_signal(signal.SIGINT)
            server.wait(30)
    summary = {
        name: {key: round(statistics.median(w[key] for w in windows), 1) for key in ("cpu_us", "p50_us")}
        for name, windows in runs.items()
    }
    pairs = [j["cpu_us"] - p["cpu_us"] for j, p in zip(runs["joined"], runs["plain"], strict=True)]
    summary["joined_minus_plain_cpu_us"] = {
        "median": round(statistics.median(pairs), 1),
        "joined_lower": sum(d < 0 for d in pairs),
    }
    return {"summary": summary, "windows": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["middleware", "head", "_serve"])
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--wrk", type=Path, help="root of the unpacked wrk and libluajit packages (head)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=20000)
    a = p.parse_args()
    if a.what == "_serve":
        serve_head(a.args[0] == "joined", int(a.args[1]))
        return
    if a.what == "middleware":
        result: dict[str, Any] = middleware(a.repeats, a.calls)
    else:
        assert a.wrk is not None, "--wrk is needed"
        result = head(a.wrk, a.rounds, a.seconds)
    print(json.dumps(result if a.what == "middleware" else result["summary"]))
    if a.what == "head":
        print(json.dumps(result["windows"]), file=sys.stderr)


if __name__ == "__main__":
    main()
