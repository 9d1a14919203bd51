"""One /classify request at a time through a real engine-core process (its Unix sockets, event loop and
batcher), from a client that speaks the API server's protocol, with a stand-in encoder: ``run_batch`` spins
``--busy-us`` per batch, as a CUDA graph replay and its spin-waited synchronisation hold the thread that runs
them. What it measures is the core's plumbing for a lone request (the frames both ways, the loop's turns, the
worker-thread hand-off or not) without a model, on any machine:

    python -m load_tests.core_roundtrip --out core_rt.json --rounds 3 --requests 4000 --busy-us 400

Each round runs the core twice, its batcher with ``inline_items`` 0 (the worker thread) and 1 (a lone batch on
the core's loop: what ``Engines.batcher(core=True)`` chooses on CUDA). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import tempfile
import time
from pathlib import Path

from engine import protocol
from engine.batcher import DynamicBatcher
from engine.classifier import ClassifyItem, ClassResult
from engine.core import EngineCore
from engine.frames import HEADER, listen
from load_tests.loadgen import percentile


def _core(address: str, inline_items: int, busy_us: float) -> None:
    def run(items: list[ClassifyItem]) -> list[ClassResult]:
        until = time.perf_counter() + busy_us / 1e6
        while time.perf_counter() < until:
            pass
        return [ClassResult(label="a", score=0.9, scores=[("a", 0.9), ("b", 0.1)]) for _ in items]

    batcher = DynamicBatcher(
        run, max_batch_size=256, max_wait_ms=0, cost=lambda it: it.n_tokens, inline_items=inline_items
    )
    asyncio.run(EngineCore(0, address, None, batcher, b"").serve())


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the engine core closed the connection")
        data += chunk
    return data


def _recv_frame(conn: socket.socket) -> bytes:
    (size,) = HEADER.unpack(_recv_exact(conn, HEADER.size))
    return _recv_exact(conn, size)


def _dial(path: str, timeout_s: float = 120.0) -> socket.socket:
    """A connection to the core once it listens (after its start); a core that never does fails the run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            time.sleep(0.01)
    raise TimeoutError(f"the core did not listen on {path} within {timeout_s:g} s")


def measure(inline_items: int, busy_us: float, requests: int, gap_s: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        core_address, own = f"{tmp}/core", f"{tmp}/api"
        core = mp.get_context("spawn").Process(target=_core, args=(core_address, inline_items, busy_us), daemon=True)
        core.start()
        listener = listen(own)
        listener.settimeout(120.0)  # a core that dies at start fails the run instead of hanging it
        push = _dial(core_address)

        def send(frame: bytes) -> None:
            push.sendall(HEADER.pack(len(frame)) + frame)

        pull = None
        try:
            send(protocol.encode(protocol.Hello(0, own)))
            pull, _ = listener.accept()  # the core's replies (classification: from its event loop)
            protocol.decode_from_core(_recv_frame(pull))
            latencies = []
            cpu0 = _cpu_s(core.pid)  # type: ignore[arg-type]
            for i in range(requests):
                item = ClassifyItem(f"text {i}", None, False, 12, ids=tuple(range(12)))
                frame = protocol.encode(protocol.Commands([protocol.ClassifyRequest(i * protocol.API_STRIDE, [item])]))
                start = time.perf_counter()
                send(frame)
                reply = protocol.decode_from_core(_recv_frame(pull))
                latencies.append(time.perf_counter() - start)
                assert isinstance(reply, protocol.ClassifyReplies) and reply.items[0].refused is None
                time.sleep(gap_s)  # the API server's and the HTTP client's share of a request
            core_cpu = _cpu_s(core.pid) - cpu0  # type: ignore[arg-type]
        finally:
            core.kill()
            for sock in (pull, push, listener):
                if sock is not None:
                    sock.close()
    return {
        "inline_items": inline_items,
        **{f"p{q}_us": round(percentile(latencies, q) * 1e6, 1) for q in (50, 90, 99)},  # type: ignore[operator]
        "core_cpu_us_per_request": round(core_cpu / requests * 1e6, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--busy-us", type=float, default=400.0, help="the stand-in encoder's time per batch")
    p.add_argument("--gap-ms", type=float, default=0.3, help="pause between requests")
    args = p.parse_args()
    runs = []
    for r in range(args.rounds):
        for inline_items in (0, 1) if r % 2 == 0 else (1, 0):
            result = measure(inline_items, args.busy_us, args.requests, args.gap_ms / 1e3)
            run = {"round": r, "busy_us": args.busy_us, **result}
            print(json.dumps(run), flush=True)
            runs.append(run)
    args.out.write_text(json.dumps({"cpu_count": os.cpu_count(), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
