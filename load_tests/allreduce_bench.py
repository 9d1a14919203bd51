"""All-reduce latency between the GPUs of one host at decode sizes (issue 17): what each of a tensor-parallel
decode step's two all-reduces per layer costs, eagerly and replayed inside a CUDA graph, as the decode
graphs run them. Two processes, NCCL, NVLink multicast off::

    python -m load_tests.allreduce_bench --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.tensor_parallel import NO_MULTICAST, init_group

SIZES = (1 * 4096, 16 * 4096, 64 * 4096, 256 * 4096)  # bf16 elements: batch x hidden of the 8B-class model
CHAIN = 64  # all-reduces per graph: one decode step of a 32-layer model


def rank_main(rank: int, store: str, out: str) -> None:
    torch.cuda.set_device(rank)
    init_group(rank, 2, store, torch.device("cuda", rank))
    results = []
    for n in SIZES:
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for _ in range(20):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        eager_us = (time.perf_counter() - t0) / 200 * 1e6
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(CHAIN):
                dist.all_reduce(x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(CHAIN):
                dist.all_reduce(x)
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        graph_us = start.elapsed_time(end) * 1e3 / (20 * CHAIN)
        results.append({"elements": n, "bytes": 2 * n, "eager_us": eager_us, "in_graph_us": graph_us})
    if rank == 0:
        Path(out).write_text(json.dumps({"chain": CHAIN, "sizes": results}, indent=1))
        for r in results:
            print(f"{r['bytes']:>8} B: eager {r['eager_us']:.1f} us, in a graph {r['in_graph_us']:.1f} us")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.update(NO_MULTICAST)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        store = f"127.0.0.1:{s.getsockname()[1]}"
    mp.spawn(rank_main, args=(store, str(Path(args.out) / "allreduce.json")), nprocs=2)


if __name__ == "__main__":
    main()
