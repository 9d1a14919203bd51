"""Round trip of a 200-byte frame between two processes, one at a time: ZeroMQ ipc PUSH/PULL pairs (what an API
server and an engine core use: each direction passes both sides' ZeroMQ I/O threads) against a plain AF_UNIX
stream socket (each side's own thread reads and writes). Blocking sockets on both sides, no event loops: the
transport's floor under a lone request's two hops.

    python -m load_tests.ipc_pingpong --out ipc_pingpong.json --rounds 3 --frames 5000

Not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from load_tests.loadgen import percentile

FRAME = b"x" * 200
WARMUP = 200


def _zmq_peer(own: str, back: str, frames: int) -> None:
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.bind(own)
    push.connect(back)
    for _ in range(frames + WARMUP):
        push.send(pull.recv())


def _unix_peer(path: str, frames: int) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    for _ in range(frames + WARMUP):
        sock.sendall(sock.recv(4096))


def round_trips(kind: str, frames: int, gap_s: float) -> dict[str, object]:
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        send: Callable[[bytes], object]
        recv: Callable[[], bytes]
        if kind == "zmq":
            peer_address, own = f"ipc://{tmp}/peer", f"ipc://{tmp}/own"
            peer = spawn.Process(target=_zmq_peer, args=(peer_address, own, frames))
            peer.start()
            context = zmq.Context()
            pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
            pull.bind(own)
            push.connect(peer_address)
            send, recv = push.send, pull.recv
        else:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(f"{tmp}/sock")
            server.listen()
            peer = spawn.Process(target=_unix_peer, args=(f"{tmp}/sock", frames))
            peer.start()
            conn, _ = server.accept()
            send, recv = conn.sendall, lambda: conn.recv(4096)
        latencies = []
        for i in range(frames + WARMUP):
            start = time.perf_counter()
            send(FRAME)
            recv()
            if i >= WARMUP:
                latencies.append(time.perf_counter() - start)
            time.sleep(gap_s)  # both sides fall asleep between requests, as at one client
        peer.join()
    return {
        "transport": kind,
        **{f"p{q}_us": round(percentile(latencies, q) * 1e6, 1) for q in (50, 90)},  # type: ignore[operator]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frames", type=int, default=5000)
    p.add_argument("--gap-ms", type=float, default=0.5)
    args = p.parse_args()
    runs = []
    for r in range(args.rounds):
        for kind in ("zmq", "unix") if r % 2 == 0 else ("unix", "zmq"):
            run = {"round": r, **round_trips(kind, args.frames, args.gap_ms / 1e3)}
            print(json.dumps(run), flush=True)
            runs.append(run)
    args.out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
