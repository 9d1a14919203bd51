"""One decoder layer's GEMMs at batch 1, fused forms against unfused ones, kernel by kernel (issue 15).

For the S and L shapes (SmolLM2-135M and -1.7B) at one row (a batch-1 decode step) or ``--rows`` rows (a batch-1
verification step's positions), each of the three forms a
decoder layer uses (RMSNorm → GEMM; GEMM → residual add; SwiGLU → GEMM → residual add) runs as the unfused layer
runs it (separate norm / SwiGLU / add kernels around the int8 weight-only GEMM or cuBLAS), and as
:func:`models.quant_kernels.fused_matmul` with the tile it picks and with each candidate tile. Each variant is
timed as a CUDA graph of ``--chain`` launches replayed many times (as a decode step's graph runs them):
microseconds per form.

    python -m load_tests.fused_gemm_bench --out load_tests/results/fused_decode/gemm

Not a test: never collected by pytest, never run in CI; needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from load_tests.graph_timing import graph_us
from models import quant_kernels as qk

SHAPES = {  # hidden, intermediate, qkv width
    "S": (576, 1536, 960),
    "L": (2048, 8192, 6144),
}
GEMV_CANDIDATES = (
    (16, 512, 4), (8, 1024, 4), (32, 256, 4), (16, 1024, 8), (64, 128, 4), (4, 2048, 4), (8, 1024, 8), (8, 512, 4),
    (4, 1024, 4), (16, 512, 8),
)  # fmt: skip


def forms(hidden: int, inter: int, qkv: int) -> dict[str, tuple[int, int, str]]:
    """name → (N, K, form) of the layer's four GEMMs."""
    return {
        "qkv": (qkv, hidden, "norm"),
        "o_proj": (hidden, hidden, "residual"),
        "gate_up": (2 * inter, hidden, "norm"),
        "down": (hidden, inter, "swiglu"),
    }


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows_out = []
    for model, rows in ((m, r) for m in args.models for r in args.rows):
        hidden, inter, qkv = SHAPES[model]
        for name, (n, k, form) in forms(hidden, inter, qkv).items():
            w = torch.randn(n, k, generator=gen) / k**0.5
            scale = w.abs().amax(dim=1) / 127.0
            q = (w / scale[:, None]).round().to(torch.int8).to(dev)
            scale, wb = scale.to(dev), w.to(dev, dtype)
            norm = torch.ones(k, device=dev, dtype=dtype)
            x = torch.randn(rows, 2 * k if form == "swiglu" else k, generator=gen).to(dev, dtype)
            res = torch.randn(rows, n, generator=gen).to(dev, dtype)
            kw: dict[str, Any] = {
                "norm": {"norm_weight": norm, "eps": 1e-5},
                "residual": {"residual": res},
                "swiglu": {"swiglu": True, "residual": res},
            }[form]
            for weights, (weight, s) in (("int8-wo", (q, scale)), ("bf16", (wb, None))):
                gemm = (lambda a, weight=weight, s=s: qk.w8a16_matmul(a, weight, s)) if s is not None else (
                    lambda a, weight=weight: F.linear(a, weight))  # fmt: skip

                def unfused(gemm=gemm, x=x, res=res, form=form, norm=norm) -> Tensor:
                    if form == "norm":
                        return gemm(F.rms_norm(x, x.shape[-1:], norm, 1e-5))
                    a = x
                    if form == "swiglu":
                        gate, up = x.chunk(2, dim=-1)
                        a = F.silu(gate) * up
                    return res + gemm(a)

                row: dict[str, Any] = {"model": model, "gemm": name, "n": n, "k": k, "rows": rows,
                                       "weights": weights, "form": form}  # fmt: skip
                row["unfused_us"] = graph_us(unfused, args.chain, args.replays)
                row["gemm_only_us"] = graph_us(lambda gemm=gemm, x=x, k=k: gemm(x[:, :k]), args.chain, args.replays)
                want = qk.fused_reference(x, weight, s, **kw).float()
                variants: dict[str, Any] = {"picked": {}}  # fused_matmul with its own tile (pick_gemv)
                variants.update({f"gemv{c}": {"gemv": c} for c in GEMV_CANDIDATES})
                for label, extra in variants.items():

                    def fused(x=x, weight=weight, s=s, kw=kw, extra=extra) -> Tensor:
                        return qk.fused_matmul(x, weight, s, **kw, **extra)

                    err = float((fused().float() - want).norm() / want.norm())
                    row[label] = {"us": graph_us(fused, args.chain, args.replays), "rel_err": err}
                best = min((v["us"], lbl) for lbl, v in row.items() if isinstance(v, dict))
                print(f"{model} rows {rows:2d} {name:8s} {weights:8s} unfused {row['unfused_us']:6.2f} us "
                      f"(GEMM alone {row['gemm_only_us']:6.2f}); picked {row['picked']['us']:6.2f}; best {best[1]} "
                      f"{best[0]:6.2f}", flush=True)  # fmt: skip
                rows_out.append(row)
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows per call: a batch-1 step's positions")
    p.add_argument("--chain", type=int, default=60)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rows = bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python -m load_tests.fused_gemm_bench " + " ".join(__import__("sys").argv[1:]),
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
