"""Tensor parallelism's step fan-out: rank 0's engine sends each step's host inputs to the other ranks,
whose runners run the same forward on their shards (models/tensor_parallel.py), meeting rank 0's
collectives. Only rank 0 schedules and samples; a step's inputs are a few kilobytes of token ids,
positions and block tables, sent over ZeroMQ before rank 0 launches its own kernels: a decode step as one
frame of a fixed header and its staging rows' bytes (no pickling on either side of the hot path), a prefill
step pickled (protocol 5).
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq
from torch import Tensor


@dataclass
class Decode:
    """A decode step staged in the first ``batch`` rows of the runner's staging buffer (engine/cuda_graphs.py)."""

    batch: int
    kv_len: int
    width: int
    rows: np.ndarray | None = None  # filled when sent: rank 0's staging rows
    q: int = 1  # tokens per row: 1, or 1 + speculative drafts


@dataclass
class Prefill:
    """A prefill (or mixed) step: token ids and positions padded to the longest row, block tables."""

    ids: Tensor
    positions: Tensor
    tables: Tensor
    q_lens: list[int]


StepInput = Decode | Prefill
STOP = b"stop"
# b"D", padding to 8 bytes, batch, kv_len, width, q; then batch x width little-endian int64 rows, 8-byte aligned
DECODE = struct.Struct("<c7x4q")
ROW = np.dtype("<i8")
PREFILL = b"P"


def encode(step: StepInput) -> bytes:
    """One frame for ``step``: a decode step's header and rows, or a prefill step pickled."""
    if isinstance(step, Decode):
        assert step.rows is not None
        rows = step.rows.astype(ROW, copy=False).tobytes()  # row-major, one copy of a strided view
        return DECODE.pack(b"D", step.batch, step.kv_len, step.width, step.q) + rows
    return PREFILL + pickle.dumps(step, protocol=5)


def decode(frame: memoryview) -> StepInput:
    """The step :func:`encode` made ``frame`` of (a decode step's rows are a view of the frame)."""
    if frame[:1] == PREFILL:
        return pickle.loads(frame[1:])
    tag, batch, kv_len, width, q = DECODE.unpack_from(frame)
    if tag != b"D" or len(frame) != DECODE.size + batch * width * ROW.itemsize:
        raise ValueError(f"not a step frame: tag {tag!r}, {len(frame)} bytes")
    rows = np.frombuffer(frame, dtype=ROW, offset=DECODE.size).reshape(batch, width)
    return Decode(batch, kv_len, width, rows, q)


class StepFanout:
    """Rank 0's side: one PUSH socket per other rank (ZeroMQ queues what a rank has not taken yet)."""

    def __init__(self, addresses: list[str]) -> None:
        self._context = zmq.Context.instance()
        self._sockets = []
        for address in addresses:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self._sockets.append(sock)

    def send(self, step: StepInput) -> None:
        frame = encode(step)
        for sock in self._sockets:
            sock.send(frame, copy=False)

    def close(self) -> None:
        for sock in self._sockets:
            sock.send(STOP)
            sock.close()


def follow(address: str, run: Callable[[StepInput], None]) -> None:
    """A non-zero rank's loop: runs every step rank 0 sends until it says stop or (checked every second
    while idle) its parent process has gone."""
    parent = os.getppid()
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.bind(address)
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:
                    return
                continue
            frame = sock.recv(copy=False)
            if frame.bytes == STOP:
                return
            run(decode(frame.buffer))
    finally:
        sock.close(linger=0)
