"""Fidelity of CPU compression settings through the served decode step and by prefill, on the same
tokens, with the spread that float rounding alone causes (issue 12).

The int8 w8a8 path quantizes every activation row on its own (per-token scales) and ``torch._int_mm``
is exact, so a decode step computes what the prefill row computes up to float rounding (attention over
a different number of keys sums in a different order). But rounding an activation to int8 is a step
function: where a value lies within a float ulp of a rounding boundary, that ulp decides which int8 it
becomes, and the changed product then moves everything downstream, including later tokens through the
KV cache. This script measures how far that alone moves the result: each prefill pass is repeated with
every quantizer input multiplied by ``1 + ε·N(0, 1)`` (ε = ``--jitter``, about one float32 ulp),
which redraws exactly those near-tie roundings, and the spread over seeds is set beside the decode
step's figure and the unperturbed prefill's.

Every split of the held-out text (``data/eval.txt`` cut in two halves: "select" to choose on,
"confirm" to check the choice on) is cut into consecutive windows of ``--window`` tokens; for each
variant and window: the perplexity, the top-1 agreement with float and the mean KL divergence from
float over the window's next-token predictions, by

- ``prefill``: one forward over the window (models/fidelity.py's method, as the startup check measures),
- ``prefill~jitter``: the same with ulp-sized noise at the quantizer inputs, one pass per seed,
- ``decode``: teacher-forced through the engine's decode step (eager), one token per step after a
  one-token prefill, over the engine's scheduler, paged KV cache and model runner.

    HF_HUB_OFFLINE=1 python -m load_tests.cpu_decode_fidelity --out OUT --seeds 4 \\
        --variants '[{"quantize":"int8","prune_mlp":0.01},{"quantize":"int8","prune_mlp":0.005}]'
    HF_HUB_OFFLINE=1 python -m load_tests.cpu_decode_fidelity --out OUT --max-windows 1 --decode-seeds 4

Not a test: minutes of model passes on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from load_tests.cpu_bench import BLOCK, Driver, compress_variant, load_base, machine, variant_name
from models import calibration as calib
from models.calibration import forward_sequence
from models.llama import Llama
from models.quantize import QuantLinear

log = logging.getLogger("cpu_decode_fidelity")


@contextlib.contextmanager
def quantizer_jitter(model: Llama, eps: float, seed: int) -> Iterator[None]:
    """Multiplies the input of every QuantLinear by ``1 + eps·N(0, 1)`` while active."""
    gen = torch.Generator().manual_seed(seed)

    def hook(_m: torch.nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0]
        return (x * (1 + eps * torch.randn(x.shape, generator=gen, dtype=x.dtype)), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def prefill_logprobs(model: Llama, window: list[int]) -> Tensor:
    """Log-probabilities of the next token after each but the last of ``window``, one forward."""
    return model.logits(forward_sequence(model, torch.tensor(window))[0, :-1]).log_softmax(-1)


def decode_logprobs(driver: Driver, window: list[int]) -> Tensor:
    """The same, teacher-forced through the served decode step (a one-token prefill, then one token a step)."""
    return driver.teacher_forced_logits(window).log_softmax(-1)


def window_stats(lp: Tensor, ref: Tensor, target: Tensor) -> dict[str, float]:
    """Sums over one window: NLL of the targets, KL(float ‖ variant), top-1 agreements, positions."""
    return {
        "nll": float(F.nll_loss(lp, target, reduction="sum")),
        "kl": float((ref.exp() * (ref - lp)).sum()),
        "agree": float((lp.argmax(-1) == ref.argmax(-1)).sum()),
        "n": float(target.numel()),
    }


def summarize(parts: list[dict[str, float]], float_nll: float) -> dict[str, float]:
    n = sum(p["n"] for p in parts)
    nll = sum(p["nll"] for p in parts)
    return {
        "perplexity": round(math.exp(nll / n), 4),
        "perplexity_change": round(math.exp((nll - float_nll) / n) - 1, 4),
        "top1_agreement": round(sum(p["agree"] for p in parts) / n, 4),
        "mean_kl": round(sum(p["kl"] for p in parts) / n, 5),
        "tokens": int(n),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default='[{"quantize":"int8","prune_mlp":0.01},{"quantize":"int8","prune_mlp":0.0}]')
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--jitter", type=float, default=1e-7, help="relative noise at the quantizer inputs")
    ap.add_argument("--seeds", type=int, default=4, help="jittered prefill passes per window; 0 skips")
    ap.add_argument("--decode-seeds", type=int, default=0, help="jittered decode-step passes per window")
    ap.add_argument("--max-windows", type=int, default=0, help="only the first N windows of each split; 0 = all")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode-step passes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lowlat-server")
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)

    loaded, float_model, _ = load_base(args.cache_dir)
    ids = loaded.tokenizer(calib.read_text(calib.EVAL_TEXT), add_special_tokens=False)["input_ids"]
    splits = {"select": ids[: len(ids) // 2], "confirm": ids[len(ids) // 2 :]}
    w = args.window
    windows = {s: [v[i : i + w] for i in range(0, len(v) - 1, w) if len(v[i : i + w]) > 1] for s, v in splits.items()}
    if args.max_windows:
        windows = {s: v[: args.max_windows] for s, v in windows.items()}
    models: dict[str, Llama] = {"float": float_model}
    reports: dict[str, dict] = {}
    for setting in json.loads(args.variants):
        name = variant_name(setting)
        models[name], reports[name] = compress_variant(loaded, setting, args.cache_dir)
    drivers = (
        {name: Driver(m, False, 1, w + 2 * BLOCK, 2048) for name, m in models.items()} if not args.no_decode else {}
    )

    paths = ["prefill", *(f"prefill~jitter{i}" for i in range(args.seeds))]
    if drivers:
        paths += ["decode", *(f"decode~jitter{i}" for i in range(args.decode_seeds))]
    # per split, variant, path: one dict of sums per window
    raw: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
    for split, wins in windows.items():
        for k, win in enumerate(wins):
            start = time.perf_counter()
            target = torch.tensor(win[1:])
            ref = prefill_logprobs(float_model, win)
            for name, model in models.items():
                per = raw.setdefault(split, {}).setdefault(name, {})
                quantized = any(isinstance(m, QuantLinear) for m in model.modules())
                for path in paths:
                    kind, _, seed = path.partition("~jitter")
                    if seed and not quantized:
                        continue
                    noise = (
                        quantizer_jitter(model, args.jitter, 1000 * k + int(seed)) if seed else contextlib.nullcontext()
                    )
                    with noise:
                        lp = decode_logprobs(drivers[name], win) if kind == "decode" else prefill_logprobs(model, win)
                    per.setdefault(path, []).append(window_stats(lp, ref, target))
            log.info("%s window %d/%d: %.1f s", split, k + 1, len(wins), time.perf_counter() - start)

    results: dict[str, dict[str, dict[str, object]]] = {}
    for split, per_variant in raw.items():
        ref_parts = per_variant["float"]["prefill"]
        float_nll = sum(p["nll"] for p in ref_parts)
        for name, per_path in per_variant.items():
            out: dict[str, object] = {path: summarize(parts, float_nll) for path, parts in per_path.items()}
            for kind in ("prefill", "decode"):
                jit = [out.pop(p) for p in list(out) if p.startswith(f"{kind}~jitter")]
                if jit:
                    changes = [j["perplexity_change"] for j in jit]  # type: ignore[index]
                    out[f"{kind}_jitter"] = {
                        "perplexity_change_each_seed": changes,
                        "perplexity_change_median": round(statistics.median(changes), 4),
                        "mean_kl_median": round(statistics.median(j["mean_kl"] for j in jit), 5),  # type: ignore[index]
                        "top1_agreement_median": round(statistics.median(j["top1_agreement"] for j in jit), 4),  # type: ignore[index]
                    }
            # Each window alone (a single context), every path and seed: perplexity change against float.
            out["per_window_perplexity_change"] = {
                path: [
                    round(math.exp((p["nll"] - f["nll"]) / p["n"]) - 1, 4)
                    for p, f in zip(parts, ref_parts, strict=True)
                ]
                for path, parts in per_path.items()
            }
            results.setdefault(name, {})[split] = out
    doc = {
        "command": "python -m load_tests.cpu_decode_fidelity " + shlex.join(sys.argv[1:] if argv is None else argv),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: v for k, v in machine().items() if k != "lscpu"},
        "threads": args.threads,
        "window": w,
        "jitter": args.jitter,
        "windows": {s: [len(x) for x in v] for s, v in windows.items()},
        "compression": {
            n: {k: r[k] for k in ("spec", "weight_bytes_after", "weight_bytes_cut")} for n, r in reports.items()
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    (args.out / "results.md").write_text(render(doc))
    print(render(doc))


def render(doc: dict) -> str:
    full = {s: [n == doc["window"] for n in v] for s, v in doc["windows"].items()}
    lines = [
        "# CPU compression settings: fidelity through the decode step and by prefill, same tokens",
        "",
        f"- Command: `{doc['command']}`",
        f"- Run: {doc['started']} to {doc['finished']} (UTC), {doc['threads']} thread(s)",
        f"- CPU: {doc['machine']['cpu_model']}, torch {doc['machine']['torch']}",
        f"- Windows of {doc['window']} tokens per split: {doc['windows']}; jitter ε = {doc['jitter']:g}",
        "",
        "Against float over all windows of the split: perplexity change / top-1 agreement / mean KL (nats per",
        "token). *jittered*: median over seeds with ulp-sized noise at the quantizer inputs, [min, max] of the",
        f"perplexity change. *worst window*: the highest perplexity change of any single full {doc['window']}-token",
        "window, over every path and seed.",
        "",
        "| variant | split | prefill | prefill, jittered | decode step | decode step, jittered | worst window |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_split in doc["results"].items():
        if name == "float":
            continue
        for split, r in per_split.items():

            def cell(p: str, r: dict = r) -> str:
                x = r.get(p)
                return f"{x['perplexity_change']:+.2%} / {x['top1_agreement']:.1%} / {x['mean_kl']:.4f}" if x else "–"

            def jit(p: str, r: dict = r) -> str:
                j = r.get(p)
                if not j:
                    return "–"
                each = j["perplexity_change_each_seed"]
                return (
                    f"{j['perplexity_change_median']:+.2%} [{min(each):+.2%}, {max(each):+.2%}] / "
                    f"{j['top1_agreement_median']:.1%} / {j['mean_kl_median']:.4f}"
                )

            per_window = r["per_window_perplexity_change"].values()
            worst = max(c for changes in per_window for c, ok in zip(changes, full[split], strict=True) if ok)
            cells = [cell("prefill"), jit("prefill_jitter"), cell("decode"), jit("decode_jitter"), f"{worst:+.2%}"]
            lines.append(f"| {name} | {split} | " + " | ".join(cells) + " |")
    fl = doc["results"].get("float", {})
    if fl:
        lines += ["", "Float itself, decode step against its prefill: " + ", ".join(
            f"{s} {r['decode']['perplexity_change']:+.4%}" for s, r in fl.items() if "decode" in r
        )]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
