"""The quantized GEMMs of models/quant_kernels.py against bf16 ``F.linear`` on the GPU, per layer shape.

For each projection shape of SmolLM2-135M and -1.7B and each row count (decode batches, prefill), it
checks the kernel against an fp32 reference on fresh random data (output poisoned first) and times:

- ``graph``: the op replayed from a CUDA graph over enough weight copies to overflow L2 (what a captured
  decode step sees: weights come from HBM, no launch gaps), µs per call;
- ``eager``: back-to-back launches from Python (what an eager prefill or /classify batch sees), µs per call;

for bf16 F.linear on the dequantized weight, the int8 weight-only kernel with the tiles ``pick_config``
chooses and with each candidate tile shape (the best is reported, to keep ``pick_config`` honest), and
the fp8 path (fused per-token activation quantization + ``_scaled_mm``).

    python -m load_tests.quant_kernel_bench --out load_tests/results/compression/quant_kernels_h100.json
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from models import quant_kernels
from models.quantize import quantize_rows

SHAPES = {  # (name, in K, out N)
    "smollm2-135m": [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
                     ("lm_head", 576, 49152)],
    "minilm-l6": [("q/k/v/o", 384, 384), ("intermediate", 384, 1536), ("output", 1536, 384)],
    "smollm2-1.7b": [("qkv", 2048, 6144), ("o", 2048, 2048), ("gate_up", 2048, 16384), ("down", 8192, 2048),
                     ("lm_head", 2048, 49152)],
}  # fmt: skip
ROWS = [1, 8, 32, 64, 128, 256, 512, 2048]
CANDIDATES = [  # BM, BN, BK, num_warps, num_stages, weight first
    (16, 16, 128, 4, 4, False), (16, 32, 128, 4, 4, False), (16, 64, 128, 4, 4, False), (16, 32, 256, 4, 4, False),
    (16, 64, 256, 4, 3, False), (32, 64, 128, 4, 4, False), (64, 64, 128, 4, 4, False), (64, 128, 64, 4, 4, False),
    (128, 128, 64, 4, 4, False), (128, 128, 64, 8, 3, False),
    (16, 64, 128, 4, 4, True), (16, 64, 256, 4, 3, True), (16, 128, 128, 4, 4, True), (32, 64, 128, 4, 4, True),
    (32, 128, 128, 4, 4, True), (64, 64, 128, 4, 4, True), (64, 128, 64, 4, 4, True), (64, 128, 128, 8, 3, True),
    (128, 128, 64, 8, 3, True), (128, 64, 64, 4, 4, True), (256, 128, 64, 8, 3, True),
]  # fmt: skip
L2_BYTES = 50 * 2**20


def graph_us(fn, copies: int, reps: int = 20) -> float:
    """µs per call of fn(i) for i over the weight copies, replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / copies)
    return sorted(times)[len(times) // 2]


def eager_us(fn, copies: int, calls: int = 200) -> float:
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for j in range(calls):
        fn(j % copies)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / calls


def measure_fp8(x: torch.Tensor, fq: list, fs: list) -> dict:
    """The fp8 method's GEMM (fused per-token quantization + _scaled_mm) at the same point."""
    copies = len(fq)
    want = quant_kernels.reference(x, fq[0], fs[0])
    got = quant_kernels.fp8_act_matmul(x, fq[0], fs[0]).float()
    return {
        "fp8_rel_err": float((got - want).norm() / want.norm()),
        "fp8_graph_us": graph_us(lambda i: quant_kernels.fp8_act_matmul(x, fq[i], fs[i]), copies),
        "fp8_eager_us": eager_us(lambda i: quant_kernels.fp8_act_matmul(x, fq[i], fs[i]), copies),
    }


def measure(x: torch.Tensor, qs: list, ss: list, ws: list) -> dict:
    """Error and timings of one (rows, weight shape) point; ``qs``/``ss``/``ws`` are the weight copies."""
    m, n = x.shape[0], qs[0].shape[0]
    copies = len(qs)
    out = torch.full((m, n), float("nan"), device=x.device, dtype=torch.bfloat16)
    out.copy_(quant_kernels.w8a16_matmul(x, qs[0], ss[0]))
    want = quant_kernels.reference(x, qs[0], ss[0])
    row = {
        "rel_err": float((out.float() - want).norm() / want.norm()),
        "bf16_rel_err": float((F.linear(x, ws[0]).float() - want).norm() / want.norm()),
        "bf16_graph_us": graph_us(lambda i: F.linear(x, ws[i]), copies),
        "int8_graph_us": graph_us(lambda i: quant_kernels.w8a16_matmul(x, qs[i], ss[i]), copies),
        "bf16_eager_us": eager_us(lambda i: F.linear(x, ws[i]), copies),
        "int8_eager_us": eager_us(lambda i: quant_kernels.w8a16_matmul(x, qs[i], ss[i]), copies),
        "picked": list(quant_kernels.pick_config(m, n, x.shape[1])),
        "best_config": None,
        "best_graph_us": float("nan"),
    }
    for cfg in CANDIDATES:
        if cfg[0] > max(16, 2 * m) or (m > 256 and cfg[0] < 64):
            continue
        try:
            t = graph_us(lambda i, c=cfg: quant_kernels.w8a16_matmul(x, qs[i], ss[i], c), copies)
        except Exception:  # a tile too large for shared memory
            continue
        if t < row["best_graph_us"] or row["best_config"] is None:
            row["best_config"], row["best_graph_us"] = list(cfg), t
    return row


def markdown(result: dict) -> str:
    """Graph-replay µs per call: bf16, int8-wo with the picked tiles (best candidate), fp8; eager µs."""
    lines = [
        f"### {result['device']} — {result['date']}, torch {result['torch']}",
        "",
        f"`{result['command']}`",
        "",
        "µs per call replayed from a CUDA graph (weights from HBM); eager = launched from Python, launch included.",
        "",
        "| model | layer (K→N) | rows | bf16 | int8-wo (best tile) | fp8 | int8-wo vs bf16 "
        "| eager bf16 / int8-wo / fp8 | int8-wo rel. err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['layer']} ({r['K']}→{r['N']}) | {r['M']} | {r['bf16_graph_us']:.1f} | "
            f"{r['int8_graph_us']:.1f} ({r['best_graph_us']:.1f}) | {r['fp8_graph_us']:.1f} | "
            f"{r['int8_graph_us'] / r['bf16_graph_us']:.2f}x | {r['bf16_eager_us']:.0f} / {r['int8_eager_us']:.0f} / "
            f"{r['fp8_eager_us']:.0f} | {r['rel_err']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    dev = torch.device("cuda")
    assert quant_kernels.usable(dev, torch.bfloat16), "int8 kernel self-check failed"
    assert quant_kernels.fp8_usable(dev, torch.bfloat16), "fp8 path self-check failed"
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for model in args.models:
        for name, k, n in SHAPES[model]:
            w = torch.randn(n, k, generator=gen) * 0.02
            q, s = quantize_rows(w, "int8")
            copies = max(2, -(-2 * L2_BYTES // (n * k)))  # int8 copies overflow L2 twice
            qs = [q.to(dev) for _ in range(copies)]
            ss = [s.to(dev) for _ in range(copies)]
            ws = [(qi.float() * si[:, None]).to(torch.bfloat16) for qi, si in zip(qs, ss, strict=True)]
            f8, f8s = quantize_rows(w, "fp8")
            fq, fs = [f8.to(dev) for _ in range(copies)], [f8s.to(dev) for _ in range(copies)]
            for m in ROWS:
                x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
                row = {"model": model, "layer": name, "K": k, "N": n, "M": m, **measure(x, qs, ss, ws)}
                row.update(measure_fp8(x, fq, fs))
                rows.append(row)
                print(
                    f"{model:13s} {name:8s} M={m:5d} err={row['rel_err']:.1e} bf16 {row['bf16_graph_us']:7.1f} "
                    f"int8 {row['int8_graph_us']:7.1f} best {row['best_graph_us']:7.1f} {row['best_config']} | "
                    f"eager bf16 {row['bf16_eager_us']:6.1f} int8 {row['int8_eager_us']:6.1f} | fp8 "
                    f"{row['fp8_graph_us']:6.1f} eager {row['fp8_eager_us']:6.1f}",
                    flush=True,
                )
    result = {
        "command": "python -m load_tests.quant_kernel_bench --out " + str(args.out),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
