"""Speculative verification steps against decode steps on the graph path, both attention paths, one run.

A verification step computes ``k + 1`` positions per row (the last token and ``k`` drafts). Through the paged
decode kernel each position is a decode query of its own (models/paged_attention.py, ``rows_per_table``);
through gather + SDPA (where the kernel cannot run, and every verification step before it could) the step
first copies every row's whole context and builds an additive mask. Per batch size this times one replay of
a decode step (width 1) and of a verification step (width ``k + 1``) on each path, on one engine built by the
server's builder, over contexts of ``--context`` tokens, and checks each verification step's logits at every
position against the other path's and against one-token decode steps at the same positions (greedy
speculation keeps a draft when it equals what decoding would have chosen: the two must agree).

    python -m load_tests.verify_step_bench --device cuda --model dummy:smollm2-135m --tokenizer .bench/tok-smollm2 \
        --out load_tests/results/speculative/verify_step_h200

Writes ``results.json`` and ``results.md`` under ``--out``. Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.cuda_graphs import DecodeGraphs
from load_tests.loadgen import environment_info
from load_tests.report import write_results
from server.config import Settings
from server.runtime import Engines

Rows = list[tuple[list[int], int, list[int]]]


def reset(decode: DecodeGraphs, paged: bool) -> None:
    """Switches the step's attention path; graphs captured on the other path are dropped (compiled steps
    guard on the switch and compile again)."""
    decode.paged_kernel = paged
    decode.graphs.clear()
    decode.outputs.clear()
    if decode.use_graphs:  # the old graphs' memory pool goes with them
        decode.pool = torch.cuda.graph_pool_handle()


def timed(decode: DecodeGraphs, rows: Rows, width: int, iters: int) -> tuple[float, Tensor]:
    """Median ms per replay of the step over ``rows`` (staging and upload included, as served) and its logits."""
    staged = decode.stage_rows(rows, width)
    _, logits = decode.replay(*staged, width)  # captures (or compiles) on first use
    times = []
    sync = torch.cuda.synchronize if decode.use_graphs else (lambda: None)
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        decode.stage_rows(rows, width)
        decode.replay(*staged, width)
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), logits.float().cpu()


def compare(a: Tensor, b: Tensor) -> dict[str, float]:
    return {
        "max_abs_logit_diff": round(float((a - b).abs().max()), 4),
        "argmax_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    top = max(args.batches)
    settings = Settings(
        gen_model=args.model,
        tokenizer=args.tokenizer,
        enable_classify=False,
        device=args.device,
        max_num_seqs=top,
        max_input_tokens=args.context + 64,
        max_new_tokens=256,
        kv_cache_tokens=max(top * (args.context + 128), 4096),
        speculative="ngram",  # captures the verification width at startup
        speculative_tokens=args.k,
        gen_quantize=args.quantize,
        compile_decode=args.compile_decode,
    )
    built = Engines.build(settings)
    assert built.engine is not None
    runner = built.engine.runner
    decode, width, bs = runner.decode, runner.verify_width, runner.blocks.block_size
    per_row = -(-(args.context + width) // bs)
    assert top * per_row < runner.blocks.num_blocks, "KV cache too small for the rows"
    gen = torch.Generator().manual_seed(0)
    vocab = runner.model.args.vocab_size
    tokens = torch.randint(0, vocab, (top, args.context + width), generator=gen).tolist()
    tables = [list(range(1 + b * per_row, 1 + (b + 1) * per_row)) for b in range(top)]
    for start in range(0, top, 16):  # the contexts' K/V, prefilled eagerly
        runner.forward_rows([(tokens[b][: args.context], 0, tables[b]) for b in range(start, min(top, start + 16))])
    kernel = decode.paged_kernel
    results: dict[str, Any] = {}
    for batch in args.batches:
        wide: Rows = [(tokens[b][args.context : args.context + width], args.context, tables[b]) for b in range(batch)]
        entry: dict[str, Any] = {}
        logits: dict[str, Tensor] = {}
        for path in [p for p in args.paths if kernel or p == "sdpa"]:
            reset(decode, path == "paged")
            one = [(t[:1], p, table) for t, p, table in wide]
            entry[f"{path}_decode_ms"], _ = timed(decode, one, 1, args.iters)
            entry[f"{path}_verify_ms"], out = timed(decode, wide, width, args.iters)
            logits[path] = out[: batch * width]
            entry[f"{path}_verify_over_decode"] = round(entry[f"{path}_verify_ms"] / entry[f"{path}_decode_ms"], 2)
            # One-token steps at each verified position (the verification step wrote their contexts' K/V).
            steps = []
            for j in range(width):
                _, step = decode.replay(*decode.stage_rows([(t[j : j + 1], p + j, tb) for t, p, tb in wide], 1), 1)
                steps.append(step[:batch].float().cpu())  # waits for the upload before the next staging
            entry[f"{path}_verify_vs_decode_steps"] = compare(logits[path], torch.stack(steps, 1).flatten(0, 1))
        if len(logits) == 2:
            entry["paged_vs_sdpa_verify"] = compare(logits["paged"], logits["sdpa"])
            entry["verify_speedup_paged_over_sdpa"] = round(entry["sdpa_verify_ms"] / entry["paged_verify_ms"], 2)
        results[f"batch {batch}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
        print(batch, results[f"batch {batch}"], flush=True)
    reset(decode, kernel)
    return {
        "benchmark": "verify_step",
        "environment": {
            **environment_info(
                "in-process decode graphs (no scheduler, no HTTP), built by server.runtime.Engines.build"
            ),
            "device": str(runner.device),
            "gpu": torch.cuda.get_device_name() if runner.device.type == "cuda" else None,
            "torch": torch.__version__,
            "dtype": str(runner.k_cache.dtype),
            "command": "python -m load_tests.verify_step_bench " + " ".join(sys.argv[1:]),
        },
        "config": {
            "model": built.served.info["generate"]["model"],
            "quantization": built.served.reports["generate"].spec.quantize,
            "compiled_decode": decode.compiled,
            "verify_width": width,
            "context_tokens": args.context,
            "iters": args.iters,
            "paged_kernel": decode.paged_kernel_error or "in use",
        },
        "results": results,
    }


def markdown(doc: dict[str, Any]) -> str:
    env, cfg = doc["environment"], doc["config"]
    lines = [
        "# Verification steps against decode steps",
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}; {env['machine']}, GPU {env['gpu']}, torch {env['torch']}, {env['dtype']}  ",
        f"Model: {cfg['model']} (quantization {cfg['quantization']}, compiled decode {cfg['compiled_decode']}); "
        f"verification width {cfg['verify_width']}; contexts of {cfg['context_tokens']} tokens; median of "
        f"{cfg['iters']} replays (staging and upload included); paged kernel: {cfg['paged_kernel']}",
        "",
        "| batch | path | decode ms | verify ms | verify / decode "
        "| verify vs one-token steps: max abs logit diff, argmax agreement |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in doc["results"].items():
        for path in ("paged", "sdpa"):
            if f"{path}_decode_ms" not in r:
                continue
            check = r[f"{path}_verify_vs_decode_steps"]
            lines.append(
                f"| {key.split()[1]} | {path} | {r[f'{path}_decode_ms']} | {r[f'{path}_verify_ms']} "
                f"| {r[f'{path}_verify_over_decode']} | {check['max_abs_logit_diff']}, {check['argmax_agreement']} |"
            )
    lines.append("")
    for key, r in doc["results"].items():
        if "paged_vs_sdpa_verify" in r:
            c = r["paged_vs_sdpa_verify"]
            lines.append(
                f"- {key}: verification {r['verify_speedup_paged_over_sdpa']}x faster through the paged kernel; "
                f"its logits against SDPA's: max abs diff {c['max_abs_logit_diff']}, argmax agreement "
                f"{c['argmax_agreement']}"
            )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:smollm2-135m")
    p.add_argument("--tokenizer", default=None, help="tokenizer files for a dummy preset")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int8-wo", "fp8"])
    p.add_argument("--compile-decode", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--k", type=int, default=4, help="drafts per row (verification width k + 1)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--context", type=int, default=448, help="tokens in each row's context before the step")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument(
        "--paths",
        nargs="+",
        default=["paged", "sdpa"],
        choices=["paged", "sdpa"],
        help="attention paths to time (compiled steps compile again for each)",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    with torch.inference_mode():
        doc = run(args)
    write_results(args.out, doc, markdown(doc))


if __name__ == "__main__":
    main()
