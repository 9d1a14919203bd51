"""Timing GPU work as a decode step's CUDA graph runs it: a chain of calls captured once, replayed many times.
Shared by the kernel benchmarks (load_tests/fused_gemm_bench.py, load_tests/allreduce_bench.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``fn`` warmed up on a side stream, then captured (as engine/cuda_graphs.py captures a step)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def graph_us(fn: Callable[[], object], chain: int, replays: int) -> float:
    """Microseconds per call of ``fn`` inside a CUDA graph of ``chain`` calls, over ``replays`` replays."""

    def calls() -> None:
        for _ in range(chain):
            fn()

    graph = capture(calls)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * chain)
