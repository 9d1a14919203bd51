"""All-reduce latency between the GPUs of one host at decode sizes (issue 17): what each of a tensor-parallel
decode step's two all-reduces per layer costs, eagerly and replayed inside a CUDA graph, as the decode
graphs run them: NCCL's (``dist.all_reduce``) against the one-shot kernel over symmetric memory that
``--tensor-parallel-all-reduce auto`` uses (models/tensor_parallel.py, set up as the server sets it up).
Two processes, NVLink multicast off::

    python -m load_tests.allreduce_bench --out DIR          # check, then time both: DIR/allreduce.json
    python -m load_tests.allreduce_bench --out DIR --check  # only the check (exit status 1 when wrong)

The check sums random bf16 tensors both ways on both GPUs, eagerly and in a graph of 64 all-reduces of
distinct tensors replayed over fresh data, and compares: the sum of two bf16 values rounds once either way,
so they should agree exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from load_tests.graph_timing import capture, graph_us
from models.tensor_parallel import NO_MULTICAST, AllReduce, init_group, make_all_reduce

SIZES = (1 * 4096, 16 * 4096, 64 * 4096, 256 * 4096)  # bf16 elements: batch x hidden of the 8B-class model
CHAIN = 64  # all-reduces per graph: one decode step of a 32-layer model
REPLAYS = 20


def nccl(x: Tensor) -> Tensor:
    dist.all_reduce(x)
    return x


def time_eager(fn: Callable[[Tensor], Tensor], x: Tensor, n: int = 200) -> float:
    for _ in range(20):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def time_graph(fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """Microseconds per all-reduce in a graph of CHAIN of them (one decode step's worth)."""
    return graph_us(lambda: fn(x), CHAIN, REPLAYS)


def compare(got: Tensor, want: Tensor) -> dict[str, object]:
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))
    return {"exact": bool(torch.equal(got, want)), "rel_max_err": err, "finite": bool(got.isfinite().all())}


def check(reduce: AllReduce, rank: int) -> dict[str, object]:
    """The production all-reduce against NCCL's on the same random tensors: eagerly at each size (and one
    past the symmetric buffer, which must go to NCCL), then inside a graph over fresh data, three replays."""
    gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
    results: list[dict[str, object]] = []
    assert reduce.symmetric is not None
    sizes = [*SIZES, 8, reduce.symmetric.max_bytes // 2 + 4096]
    for n in sizes:
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
        want, got = nccl(x.clone()), reduce(x.clone())
        results.append({"where": "eager", "elements": n, "one_shot": reduce.symmetric.fits(x), **compare(got, want)})
    xs = [torch.zeros(SIZES[i % len(SIZES)], device="cuda", dtype=torch.bfloat16) for i in range(CHAIN)]
    ys: list[Tensor] = []  # the captured sums (graph memory that each replay rewrites)

    def chain() -> None:
        ys[:] = [reduce(x.clone()) for x in xs]

    graph = capture(chain)
    for replay in range(3):
        for x in xs:
            x.copy_(torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=gen))
        graph.replay()
        wants = [nccl(x.clone()) for x in xs]
        worst = max((compare(y, w) for y, w in zip(ys, wants, strict=True)), key=lambda r: r["rel_max_err"])
        exact = all(torch.equal(y, w) for y, w in zip(ys, wants, strict=True))
        results.append({"where": f"graph replay {replay}", "elements": "chain", **worst, "exact": exact})
    return {
        "ok": all(r["finite"] and r["exact"] for r in results),  # two ranks: one rounding either way
        "fused_copy": reduce.symmetric.fused_copy,
        "results": results,
    }


def rank_main(rank: int, store: str, out: str, check_only: bool) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    init_group(rank, 2, store, device)
    reduce = make_all_reduce("auto", device, torch.bfloat16)
    if reduce.symmetric is None:
        print(f"rank {rank}: symmetric memory all-reduce could not be set up (see the warning above)", flush=True)
        sys.exit(1)
    checked = check(reduce, rank)
    print(f"rank {rank} check: ok={checked['ok']} fused_copy={checked['fused_copy']}", flush=True)
    for r in checked["results"]:
        print(f"rank {rank}   {r}", flush=True)
    report: dict[str, object] = {"chain": CHAIN, "torch": torch.__version__, "check": checked}
    both = torch.tensor([int(checked["ok"])], device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MIN)  # time only when both ranks passed: they run the same collectives
    checked["both_ranks_ok"] = bool(both.item())
    if checked["both_ranks_ok"] and not check_only:
        sizes = []
        for n in SIZES:
            x = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
            row: dict[str, object] = {"elements": n, "bytes": 2 * n}
            for kind, fn in (("nccl", nccl), ("one_shot", reduce)):
                row[kind] = {"eager_us": time_eager(fn, x), "in_graph_us": time_graph(fn, x)}
            sizes.append(row)
        report["sizes"] = sizes
        if rank == 0:
            for r in sizes:
                print(
                    f"{r['bytes']:>8} B: NCCL eager {r['nccl']['eager_us']:.1f} us, in a graph "
                    f"{r['nccl']['in_graph_us']:.1f} us | one-shot eager {r['one_shot']['eager_us']:.1f} us, "
                    f"in a graph {r['one_shot']['in_graph_us']:.1f} us",
                    flush=True,
                )
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(report, indent=1))
    if rank == 0:
        Path(out).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    if not checked["both_ranks_ok"]:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--check", action="store_true", help="only check the one-shot all-reduce against NCCL")
    args = parser.parse_args()
    os.environ.update(NO_MULTICAST)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        store = f"127.0.0.1:{s.getsockname()[1]}"
    name = "check.json" if args.check else "allreduce.json"
    mp.spawn(rank_main, args=(store, str(Path(args.out) / name), args.check), nprocs=2)


if __name__ == "__main__":
    main()
