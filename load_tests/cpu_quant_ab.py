"""Eager CPU decode-step time of each generation quantization method, interleaved in one process.

Run it once natively and once with the CPU's instruction sets capped to AVX2 (oneDNN and ATen honour
these variables), to see whether ``auto``'s choice would change on a CPU without AVX-512/VNNI::

    HF_HUB_OFFLINE=1 python -m load_tests.cpu_quant_ab --out native.json
    HF_HUB_OFFLINE=1 python -m load_tests.cpu_quant_ab --settings int8:0.01,int8:0 --out prune_ab.json
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 HF_HUB_OFFLINE=1 python -m load_tests.cpu_quant_ab --out avx2.json

The cap is an emulation: the capped code paths run on this CPU's cores, not on an AVX2-only CPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.cuda_graphs import DecodeConfig
from engine.kv_cache import BlockManager
from engine.model_runner import ModelRunner
from models.compress import compress_causal_lm, default_spec
from models.llama import Llama
from models.loader import load_causal_lm

SETTINGS = "int8:0.01,int8-wo:0.01,none:0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=SETTINGS, help="method:prune_mlp pairs, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--kv-len", type=int, default=128)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lowlat-server")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    loaded = load_causal_lm("default", args.cache_dir, torch.float32)
    runners = {}
    for setting in args.settings.split(","):
        method, prune = setting.split(":")
        model = Llama.from_hf(loaded.config, {k: v.clone() for k, v in loaded.state_dict.items()})
        spec = default_spec(method, float(prune))
        cache = args.cache_dir if not spec.is_identity else None
        model, _ = compress_causal_lm(model, loaded.config, loaded.tokenizer, spec, loaded.source, cache)
        runner = ModelRunner(
            model, BlockManager(65, 16), torch.device("cpu"), torch.float32, DecodeConfig(max(batches), 1024)
        )
        runner.decode.inputs[:, 1] = args.kv_len - 28  # every row at one position, eight blocks of context
        runner.decode.inputs[:, 2:10] = torch.arange(1, 9)
        runners[setting] = runner
    times: dict[str, list[float]] = {f"{m}@b{b}": [] for m in runners for b in batches}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for method, runner in runners.items():
                for b in batches:
                    runner.decode._forward(b, args.kv_len)
                    start = time.perf_counter()
                    for _ in range(10):
                        runner.decode._forward(b, args.kv_len)
                    times[f"{method}@b{b}"].append(100 * (time.perf_counter() - start))  # ms per step
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
        "torch": torch.__version__,
        "threads": args.threads,
        "kv_len": args.kv_len,
        "step_ms_median": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "step_ms": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["step_ms_median"], indent=1))


if __name__ == "__main__":
    main()
