"""Decode steps with and without compiled (fused) layers, side by side in one run (issue 15, item 1).

Per model (S = dummy:smollm2-135m, L = dummy:smollm2-1.7b; random weights, bf16) and per weight format
(bf16; int8 weight-only, the CUDA default at small batches), the same engine is built twice: decode
steps captured as CUDA graphs of the eager step ("eager") and of the ``torch.compile``d step
("compiled", ``EngineConfig.compile_decode``). For each: build time (compile + capture), logits against
HF transformers on the same weights (bf16 and an fp32 reference), batch-1 ms per step, kernel count
and summed kernel time of one step at batch 1, 8, 64 and 256, and engine-level throughput at 1, 16, 64
and 256 concurrent requests of 128 new tokens (no HTTP; load_tests/gpu_bench.py's closed loop). ``--step`` picks
eager and/or compiled steps; ``--gemms unfused fused`` builds each also without the batch-1 fused GEMMs
(models/quant_kernels.py ``fused_matmul``), which are on by default where the layers allow.

    python -m load_tests.fused_decode_bench --tokenizer .bench/tok-smollm2 --out load_tests/results/fused_decode

``--device cpu`` runs the same comparison on CPU at small sizes (compiled = inductor's C++ backend).
Not a test: never collected by pytest, never run in CI.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from engine.llm_engine import EngineConfig, LLMEngine
from load_tests import gpu_bench
from models.llama import Llama
from models.loader import load_causal_lm
from models.quantize import fuse_quantized_projections, quantize_modules

MODELS = {"S": "dummy:smollm2-135m", "L": "dummy:smollm2-1.7b"}
PROFILE_BATCHES = (1, 8, 64, 256)


def build(
    loaded: Any, weights: str, compile_decode: bool, gemms: str, args: argparse.Namespace
) -> tuple[LLMEngine, float]:
    model = Llama.from_hf(loaded.config, {k: v.clone() for k, v in loaded.state_dict.items()})
    model.fold_into_gemms = gemms == "fused"
    if weights == "int8-wo":
        quantize_modules(model, "int8-wo", keep=lambda name: name == "lm_head", embeddings=False)
        fuse_quantized_projections(model)
    model = model.to(args.dev)
    config = EngineConfig(**{**gpu_bench.engine_config(args.max_seqs).__dict__, "compile_decode": compile_decode})
    start = time.perf_counter()
    engine = LLMEngine(model, loaded.tokenizer, args.dev, args.dtype, config)
    return engine, time.perf_counter() - start


def one(
    loaded: Any, hf: Any, hf32: Any, weights: str, compiled: bool, gemms: str, args: argparse.Namespace
) -> dict[str, Any]:
    engine, build_s = build(loaded, weights, compiled, gemms, args)
    vocab = loaded.config.vocab_size
    name = f"{weights}/{'compiled' if compiled else 'eager'}/{gemms}"
    fused = sum(layer.fused_gemms for layer in engine.runner.model.layers)
    gpu_bench.log(
        f"  {name}: built in {build_s:.1f} s ({len(engine.runner.decode.graphs)} graphs, {fused} layers fused)"
    )
    out: dict[str, Any] = {"weights": weights, "compiled": compiled, "gemms": gemms, "fused_layers": fused}
    out["build_s"] = build_s
    out["correctness"] = gpu_bench.correctness(engine, hf, hf32, vocab, steps=16)
    out["correctness_b1"] = gpu_bench.correctness(engine, hf, hf32, vocab, steps=16, batch=1)  # batch-1 graphs
    out["batch1"] = gpu_bench.batch1_step_ms(engine, vocab, steps=args.steps)
    gpu_bench.log(f"  {name}: batch 1 {out['batch1']}")
    if args.dev.type == "cuda":
        kv = gpu_bench.PROMPT_LEN + gpu_bench.NEW_TOKENS
        batches = [b for b in PROFILE_BATCHES if b <= args.max_seqs]
        out["profile"] = [gpu_bench.decode_profile(engine, b, kv) for b in batches]
        for p in out["profile"]:
            gpu_bench.log(f"  {name}: batch {p['batch']}: {p['kernels']} kernels, {p['kernel_ms_sum']:.3f} ms")
    if args.levels:
        out["engine"] = gpu_bench.engine_level(engine, vocab, tuple(args.levels), gil_ab=False)
    del engine
    gc.collect()
    if args.dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def bench_model(key: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    spec = MODELS[key]
    gpu_bench.log(f"{key}: loading {spec}")
    loaded = load_causal_lm(spec, Path(tempfile.mkdtemp()), args.dtype, args.tokenizer)
    with args.dev:
        hf = AutoModelForCausalLM.from_config(copy.deepcopy(loaded.config), dtype=args.dtype)
    hf.load_state_dict(loaded.state_dict, strict=False)
    hf = hf.to(args.dev).eval()
    hf32 = copy.deepcopy(hf).float()
    runs = []
    for weights in args.weights:
        for step in args.step:
            for gemms in args.gemms:
                runs.append(one(loaded, hf, hf32, weights, step == "compiled", gemms, args))
    return {"spec": spec, "runs": runs}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Fused (compiled) decode steps vs eager steps",
        "",
        f"{results['date']} · {results['device']} · torch {results['torch']} · main at `{results['commit']}`",
        f"Command: `{results['command']}`",
        "",
        "Both variants of each row are the same engine in the same process, one after the other; decode steps",
        "replay as CUDA graphs in both. Kernels: one step's kernels (profiler) at KV length "
        f"{gpu_bench.PROMPT_LEN + gpu_bench.NEW_TOKENS}.",
        "",
        "| model | weights | step | GEMMs | build s | batch-1 ms/step (p50) | graph replay ms | kernels b1/b8/b64/b256 "
        "| kernel ms b1/b8/b64/b256 | decode err vs fp32 (HF bf16) | at batch 1 | tok/s c1/c16/c64/c256 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, model in results["models"].items():
        for r in model["runs"]:
            prof = r.get("profile", [])
            kernels = "/".join(str(p["kernels"]) for p in prof) or "–"
            kms = "/".join(f"{p['kernel_ms_sum']:.2f}" for p in prof) or "–"
            c = r["correctness"]["decode_rel_err_vs_fp32"]
            c1 = r.get("correctness_b1", {}).get("decode_rel_err_vs_fp32")
            b1 = f"{c1['ours_bf16']:.2e} ({c1['hf_bf16']:.2e})" if c1 else "–"
            tput = "/".join(f"{e['output_tokens_per_s']:.0f}" for e in r.get("engine", [])) or "–"
            replay = r["batch1"]["graph_replay_ms_at_max_kv_bucket"]
            lines.append(
                f"| {key} | {r['weights']} | {'compiled' if r['compiled'] else 'eager'} "
                f"| {r.get('gemms', 'unfused')} ({r.get('fused_layers', 0)} layers) | {r['build_s']:.0f} "
                f"| {r['batch1']['step_ms_p50']:.3f} | {'–' if replay is None else f'{replay:.3f}'} | {kernels} "
                f"| {kms} | {c['ours_bf16']:.2e} ({c['hf_bf16']:.2e}) | {b1} | {tput} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--weights", nargs="+", default=["bf16", "int8-wo"], choices=["bf16", "int8-wo"])
    p.add_argument("--step", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument(
        "--gemms", nargs="+", default=["fused"], choices=["fused", "unfused"],
        help="fused: norms, SwiGLU and residual adds folded into the GEMMs where the layers allow (the default)",
    )  # fmt: skip
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokenizer", default=None, help="tokenizer files for the dummy presets")
    p.add_argument("--levels", nargs="*", type=int, default=list(gpu_bench.CONCURRENCY))
    p.add_argument("--max-seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.dev = torch.device(args.device)
    args.dtype = torch.bfloat16 if args.dev.type == "cuda" else torch.float32
    gpu_bench.DEV = args.dev
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.dev.type == "cuda" else platform.processor() or "cpu"
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "commit": commit or "unknown",
        "command": "python -m load_tests.fused_decode_bench " + " ".join(__import__("sys").argv[1:]),
        "models": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for key in args.models:
        results["models"][key] = bench_model(key, args)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "README.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
