"""Our CPU generation path against llama.cpp on the same GGUF, same prompts, same process, interleaved.

Each round runs every variant once, one after the other (each compression setting of ours in ``--variants``,
eager and/or with compiled decode steps, then llama.cpp), so a machine shared with other jobs slows all of
them alike; the report takes medians over rounds. Ours runs through the engine's own parts (Scheduler,
BlockManager, ModelRunner: the step loop of engine/llm_engine.py without its thread and HTTP), llama.cpp
through llama-cpp-python's low-level eval loop. Both decode greedily and ignore end-of-sequence tokens,
so every run makes the same number of tokens.

Measured: batch-1 decode tokens/s, time of a 512-token prefill, aggregate tokens/s of 4 and 16
concurrent streams (ours; llama-cpp-python decodes one sequence per context), and the fidelity of each
variant against the float model on the held-out text cut in two halves, "select" (to choose a setting
on) and "confirm" (to check the choice on data not used to make it): perplexity change and top-1
agreement over consecutive windows (models/fidelity.py, as the startup check measures), and teacher-forced
through the served decode step itself (compiled or not), so a faster path carries its quality figure.

llama-cpp-python is not a dependency of the server: install it first (a source build, ~10 minutes on 2
cores; ``LLAMA_CPP_WHEEL_DIR`` points at a directory of already built wheels to reuse). A native
build crashes on Intel AMX machines; these CMake flags build the AVX-512 path without AMX::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \\
      -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \\
      pip wheel --no-deps -w "$LLAMA_CPP_WHEEL_DIR" llama-cpp-python==0.3.36
    pip install --no-deps diskcache "$LLAMA_CPP_WHEEL_DIR"/llama_cpp_python-0.3.36-*.whl

    HF_HUB_OFFLINE=1 python -m load_tests.cpu_bench --threads 1,2 --rounds 5 --out load_tests/results/cpu_vs_llamacpp
    HF_HUB_OFFLINE=1 python -m load_tests.cpu_bench --threads 2 --out OUT --variants \
      '[{"quantize": "int8", "prune_mlp": 0.01}, {"quantize": "int8", "prune_mlp": 0.01, "keep_float": ["lm_head"]}]'

Not a test: never collected by pytest, never run in CI (minutes of compiling and measuring).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cuda_graphs import DecodeConfig
from engine.kv_cache import BlockManager
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import SamplingParams, Sequence
from models import calibration as calib
from models.compress import CompressionSpec, compress_causal_lm, default_spec
from models.cpu_policy import cpu_features
from models.fidelity import evaluate_lm, top1_agreement
from models.llama import Llama
from models.loader import LoadedCausalLM, load_causal_lm
from models.sources import resolve_spec

log = logging.getLogger("cpu_bench")
BLOCK = 16


class Driver:
    """The engine's step loop over its real scheduler, KV cache and model runner, synchronous."""

    def __init__(self, model: Llama, compile_cpu: bool, max_num_seqs: int, kv_tokens: int, max_len: int) -> None:
        self.blocks = BlockManager(kv_tokens // BLOCK + 1, BLOCK, enable_prefix_caching=False)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_batched_tokens=512)
        start = time.perf_counter()
        self.runner = ModelRunner(
            model, self.blocks, torch.device("cpu"), torch.float32, DecodeConfig(max_num_seqs, max_len, compile_cpu)
        )
        self.setup_seconds = time.perf_counter() - start

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[float], float, int]:
        """(time to first token of each prompt, total seconds, generated tokens)."""
        seqs = [Sequence(prompt_ids=list(p), params=SamplingParams(max_tokens=max_tokens)) for p in prompts]
        start = time.perf_counter()
        first: dict[int, float] = {}
        for s in seqs:
            self.scheduler.add(s)
        while self.scheduler.has_work():
            batch, _ = self.scheduler.schedule()
            tokens = self.runner.run(batch)
            now = time.perf_counter()
            for seq, token in zip(batch, tokens, strict=True):
                seq.num_computed += seq.num_step_tokens
                seq.num_scheduled = 0
                self.blocks.commit(seq)
                if token is None:
                    continue
                seq.output_ids.append(token)
                first.setdefault(id(seq), now - start)
                if len(seq.output_ids) >= max_tokens:
                    self.scheduler.finish(seq, "length")
        total = time.perf_counter() - start
        return [first[id(s)] for s in seqs], total, sum(len(s.output_ids) for s in seqs)

    @torch.inference_mode()
    def teacher_forced_logits(self, ids: list[int]) -> torch.Tensor:
        """Float logits [len(ids) - 1, vocab] predicting ``ids[1:]``, one decode step per token (the served
        decode path, compiled or not) after a one-token prefill."""
        seq = Sequence(prompt_ids=ids[:1], params=SamplingParams(max_tokens=len(ids)))
        self.scheduler.add(seq)
        rows = []
        for token in ids[1:]:
            batch, is_prefill = self.scheduler.schedule()
            if is_prefill:
                input_ids, positions, meta, last = self.runner._prepare(batch)
                hidden = self.runner.model(input_ids, positions, meta, (self.runner.k_cache, self.runner.v_cache))
                logits = self.runner.model.logits(hidden[0, last[0]].unsqueeze(0))
            else:
                _, logits = self.runner.decode.run(batch)
            rows.append(logits[0].float())
            seq.num_computed += seq.num_step_tokens
            seq.num_scheduled = 0
            self.blocks.commit(seq)
            seq.output_ids.append(token)
        self.scheduler.finish(seq, "length")
        return torch.stack(rows)

    def teacher_forced(self, ids: list[int]) -> tuple[float, list[int]]:
        """Perplexity of ``ids[1:]`` and the greedy token at each position, through the served decode step."""
        logits = self.teacher_forced_logits(ids)
        nll = float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        return math.exp(nll / (len(ids) - 1)), logits.argmax(-1).tolist()


class LlamaCpp:
    """llama-cpp-python on the GGUF file: one sequence, greedy, ``n_threads`` for decode and prefill."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama as LlamaCppModel

        self.model = LlamaCppModel(
            str(gguf), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def generate(self, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
        """(time to first token, total seconds, generated tokens)."""
        m = self.model
        m.reset()
        start = time.perf_counter()
        m.eval(prompt)
        ttft = 0.0
        for i in range(max_tokens):
            token = m.sample(temp=0.0)
            if i == 0:
                ttft = time.perf_counter() - start
            if i + 1 < max_tokens:
                m.eval([token])
        return ttft, time.perf_counter() - start, max_tokens


def decode_rate(ttft: float, total: float, tokens: int) -> float:
    """Tokens after the first per second of the time after the first (prefill excluded)."""
    return (tokens - 1) / (total - ttft)


def machine() -> dict[str, object]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    return {
        "cpu_model": model or platform.processor(),
        "cpu_features": sorted(cpu_features() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"}),
        "logical_cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "llama_cpp_python": _version("llama-cpp-python"),
        "python": platform.python_version(),
        "lscpu": lscpu,
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_base(cache_dir: Path) -> tuple[LoadedCausalLM, Llama, str]:
    """(the embedded model as the server loads it, its float model, the GGUF path)."""
    loaded = load_causal_lm("default", cache_dir, torch.float32)
    float_model = Llama.from_hf(loaded.config, {k: v.clone() for k, v in loaded.state_dict.items()})
    return loaded, float_model, str(resolve_spec("default", "generate").path)


def compress_variant(loaded: LoadedCausalLM, setting: dict, cache_dir: Path) -> tuple[Llama, dict]:
    """A variant's served model and compression report; settings not named take ``default_spec``'s."""
    base = default_spec(setting["quantize"], setting.get("prune_mlp", 0.0))
    spec = CompressionSpec.model_validate({**base.model_dump(), **{k: v for k, v in setting.items() if k != "paths"}})
    model = Llama.from_hf(loaded.config, {k: v.clone() for k, v in loaded.state_dict.items()})
    model, report = compress_causal_lm(model, loaded.config, loaded.tokenizer, spec, loaded.source, cache_dir)
    return model, report.model_dump(mode="json")


def variant_name(setting: dict) -> str:
    """A short label: ``int8+p1%``, ``int8+p0.5%``, ``int8+p1%+float(layers.0.*)``."""
    name = setting["quantize"] + (f"+p{100 * setting['prune_mlp']:g}%" if setting.get("prune_mlp") else "")
    keep = setting.get("keep_float")
    return name + (f"+float({','.join(keep)})" if keep else "")


def split_fidelity(
    models: dict[str, Llama], float_model: Llama, splits: dict[str, list[int]], windows: list[int]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per model, per split and window length: perplexity change and top-1 agreement against the float
    model, teacher-forced over consecutive windows (models/fidelity.py, as the startup check measures)."""
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for split, ids in splits.items():
        for w in windows:
            chunks = [torch.tensor(ids[i : i + w]) for i in range(0, len(ids) - 1, w) if len(ids[i : i + w]) > 1]
            ref = evaluate_lm(float_model, chunks)
            for name, model in models.items():
                ev = evaluate_lm(model, chunks)
                out[name][f"{split}@{w}"] = {
                    "perplexity_float": round(ref.perplexity, 4),
                    "perplexity": round(ev.perplexity, 4),
                    "perplexity_change": round(ev.perplexity / ref.perplexity - 1, 4),
                    "top1_agreement": round(top1_agreement(ref, ev), 4),
                    "tokens": ev.tokens,
                }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="torch and llama.cpp thread counts to measure")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--streams", default="4,16")
    ap.add_argument(
        "--variants",
        default='[{"quantize": "int8", "prune_mlp": 0.01}]',
        help="JSON list of our compression settings (models.compress.CompressionSpec fields; the rest as "
        'default_spec); a setting may name its "paths" (eager, compiled), else --paths',
    )
    ap.add_argument("--paths", default="eager,compiled", help="decode paths of each variant")
    ap.add_argument("--fidelity-tokens", type=int, default=512, help="teacher-forced decode steps per split; 0 skips")
    ap.add_argument("--fidelity-windows", default="256,512", help="window lengths of the split fidelity; '' skips")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lowlat-server")
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    ap.add_argument("--render", action="store_true", help="only rewrite results.md from --out's results.json")
    args = ap.parse_args(argv)
    if args.render:
        (args.out / "results.md").write_text(render_markdown(json.loads((args.out / "results.json").read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = [int(t) for t in args.threads.split(",")]
    streams = [int(s) for s in args.streams.split(",")]
    settings = json.loads(args.variants)
    started = datetime.now(timezone.utc)

    loaded, float_model, gguf = load_base(args.cache_dir)
    ids = loaded.tokenizer(calib.read_text(calib.EVAL_TEXT), add_special_tokens=False)["input_ids"]
    # Held-out text in two halves: "select" to choose a setting on, "confirm" to check the choice on.
    splits = {"select": ids[: len(ids) // 2], "confirm": ids[len(ids) // 2 :]}
    short = ids[:16]
    long = ids[:512]
    max_seqs = max(streams)
    kv = 512 + max_seqs * (16 + args.decode_tokens) + 2 * BLOCK * max_seqs
    models: dict[str, Llama] = {}
    reports: dict[str, dict] = {}
    paths: dict[str, list[str]] = {}
    for setting in settings:
        name = variant_name(setting)
        models[name], reports[name] = compress_variant(loaded, setting, args.cache_dir)
        paths[name] = setting.get("paths", args.paths.split(","))
        log.info("%s: %s", name, reports[name]["fidelity"])
    windows = [int(w) for w in args.fidelity_windows.split(",") if w]
    fidelity = split_fidelity(models, float_model, splits, windows) if windows else {}
    log.info("split fidelity %s", fidelity)

    drivers: dict[tuple[str, int], Driver] = {}
    setup: dict[str, float] = {}
    for name, model in models.items():
        eager = Driver(model, False, max_seqs, kv, 2048) if "eager" in paths[name] else None
        for t in threads:
            if eager is not None:
                drivers[f"{name}/eager", t] = eager
            if "compiled" in paths[name]:
                # Inductor builds its kernels for the thread count set at compile time (a change
                # recompiles): one compiled runner per thread count, as a server sets its threads first.
                torch.set_num_threads(t)
                log.info("compiling decode steps of %s for %d thread(s)", name, t)
                drivers[f"{name}/compiled", t] = d = Driver(model, True, max_seqs, kv, 2048)
                setup[f"{name}/compile_seconds@{t}t"] = round(d.setup_seconds, 2)
    log.info("setup %s", setup)

    decode_fidelity: dict[str, dict[str, dict[str, float]]] = {}
    if args.fidelity_tokens:
        torch.set_num_threads(threads[0])
        reference = Driver(float_model, False, 1, 2 * args.fidelity_tokens + 2 * BLOCK, 2048)
        for split, split_ids in splits.items():
            fid_ids = split_ids[: args.fidelity_tokens + 1]
            float_ppl, float_greedy = reference.teacher_forced(fid_ids)
            decode_fidelity.setdefault("float", {})[split] = {"perplexity": round(float_ppl, 4)}
            for (name, t), d in drivers.items():
                if t != threads[0]:
                    continue
                ppl, greedy = d.teacher_forced(fid_ids)
                agree = sum(a == b for a, b in zip(greedy, float_greedy, strict=True)) / len(greedy)
                decode_fidelity.setdefault(name, {})[split] = {
                    "perplexity": round(ppl, 4),
                    "perplexity_change": round(ppl / float_ppl - 1, 4),
                    "top1_agreement_with_float": round(agree, 4),
                }
        log.info("fidelity (teacher-forced decode steps, %d tokens) %s", args.fidelity_tokens, decode_fidelity)
    del float_model

    rows: list[dict] = []
    llama_cpp: dict[int, LlamaCpp] = {}
    for r in range(args.rounds):
        for t in threads:
            torch.set_num_threads(t)
            for (name, dt), d in drivers.items():
                if dt != t:
                    continue
                ttft, total, n = d.generate([short], args.decode_tokens)
                p_ttft, _, _ = d.generate([long], 1)
                row = {"round": r, "threads": t, "variant": name, "decode_tok_s": decode_rate(ttft[0], total, n),
                       "prefill_512_ms": 1000 * p_ttft[0]}  # fmt: skip
                for s in streams:
                    prompts = [ids[i * 8 : i * 8 + 16] for i in range(s)]
                    _, total, n = d.generate(prompts, args.decode_tokens)
                    row[f"streams_{s}_tok_s"] = n / total
                rows.append(row)
                log.info("%s", row)
            if not args.no_llama_cpp:
                if t not in llama_cpp:
                    llama_cpp[t] = LlamaCpp(Path(gguf), t)
                cpp = llama_cpp[t]
                ttft, total, n = cpp.generate(short, args.decode_tokens)
                p_ttft, _, _ = cpp.generate(long, 1)
                row = {"round": r, "threads": t, "variant": "llama_cpp", "decode_tok_s": decode_rate(ttft, total, n),
                       "prefill_512_ms": 1000 * p_ttft}  # fmt: skip
                rows.append(row)
                log.info("%s", row)

    out = {
        "command": "python -m load_tests.cpu_bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "gguf": gguf,
        "splits": {k: len(v) for k, v in splits.items()},
        "compression": reports,
        "setup_seconds": setup,
        "fidelity_splits": fidelity,
        "fidelity_teacher_forced": decode_fidelity,
        "summary_medians": summarize(rows, streams) if rows else {},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    (args.out / "results.md").write_text(render_markdown(out))
    print(json.dumps(out["summary_medians"], indent=1))


def render_markdown(results: dict) -> str:
    """The summary as tables: fidelity per variant and split, speed medians per thread count beside
    llama.cpp with the ratios."""
    m = results["machine"]
    lines = [
        "# CPU generation: ours against llama.cpp (same GGUF, same process, interleaved rounds)",
        "",
        f"- Command: `{results['command']}`",
        f"- Run: {results['started']} to {results['finished']} (UTC)",
        f"- CPU: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, flags {', '.join(m['cpu_features'])}",
        f"- torch {m['torch']}, llama-cpp-python {m['llama_cpp_python']}, Python {m['python']}",
        f"- Model: {Path(results['gguf']).name}; held-out text split {results['splits']} tokens; "
        f"compile setup seconds {results['setup_seconds']}",
    ]
    fid = results.get("fidelity_splits") or {}
    if fid:
        keys = list(next(iter(fid.values())))
        lines += [
            "",
            "Fidelity against the float model, teacher-forced over consecutive windows (split@window): "
            "perplexity change / top-1 agreement.",
            "",
            "| variant | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for name, per in fid.items():
            cells = [f"{per[k]['perplexity_change']:+.1%} / {per[k]['top1_agreement']:.1%}" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tf = results.get("fidelity_teacher_forced") or {}
    if tf:
        lines += [
            "",
            "Teacher-forced through the served decode step (one token per step), the first tokens of each split: "
            "perplexity (change) / top-1 agreement with float.",
            "",
            "| decode path | " + " | ".join(tf["float"]) + " |",
            "|---|" + "---|" * len(tf["float"]),
        ]
        for name, per in tf.items():
            cells = [
                f"{f['perplexity']:.3f}"
                + (f" ({f['perplexity_change']:+.1%})" if "perplexity_change" in f else "")
                + (f" / {f['top1_agreement_with_float']:.1%}" if "top1_agreement_with_float" in f else "")
                for f in per.values()
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results["summary_medians"]:
        lines += [
            "",
            "Speed: medians over rounds; *best* = the least disturbed round (highest rate).",
            "",
            "| threads | variant | decode tok/s | vs llama.cpp | best decode tok/s | best vs llama.cpp "
            "| prefill 512 ms | vs llama.cpp (time) | 4 streams tok/s | 16 streams tok/s "
            "| 16 streams / llama.cpp batch-1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for name, g in results["summary_medians"].items():
        variant, threads = name.rsplit("@", 1)

        def cell(key: str, g: dict = g) -> str:
            return f"{g[key]:g}" if key in g else "–"

        cols = [
            "decode_tok_s",
            "decode_vs_llama_cpp",
            "best_decode_tok_s",
            "best_decode_vs_llama_cpp",
            "prefill_512_ms",
            "prefill_time_vs_llama_cpp",
            "streams_4_tok_s",
            "streams_16_tok_s",
            "streams_16_vs_llama_cpp_batch1",
        ]
        lines.append(f"| {threads.removesuffix('t')} | {variant} | " + " | ".join(cell(c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict], streams: list[int]) -> dict[str, dict]:
    """Median of each measure per (threads, variant), and each of ours as a ratio to llama.cpp's."""
    keys = ["decode_tok_s", "prefill_512_ms", *(f"streams_{s}_tok_s" for s in streams)]
    groups: dict[str, dict[str, float]] = {}
    for t in sorted({r["threads"] for r in rows}):
        for v in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if r["threads"] == t and r["variant"] == v]
            if sel:
                g = {k: round(statistics.median(r[k] for r in sel), 2) for k in keys if k in sel[0]}
                # The least disturbed round: on a shared machine a stalled thread can cost a run 10x.
                g["best_decode_tok_s"] = round(max(r["decode_tok_s"] for r in sel), 2)
                g["best_prefill_512_ms"] = round(min(r["prefill_512_ms"] for r in sel), 2)
                groups[f"{v}@{t}t"] = g
    for name, g in groups.items():
        cpp = groups.get("llama_cpp@" + name.split("@")[1])
        if cpp is None or name.startswith("llama_cpp"):
            continue
        g["decode_vs_llama_cpp"] = round(g["decode_tok_s"] / cpp["decode_tok_s"], 3)
        g["best_decode_vs_llama_cpp"] = round(g["best_decode_tok_s"] / cpp["best_decode_tok_s"], 3)
        g["prefill_time_vs_llama_cpp"] = round(g["prefill_512_ms"] / cpp["prefill_512_ms"], 3)
        for s in streams:
            g[f"streams_{s}_vs_llama_cpp_batch1"] = round(g[f"streams_{s}_tok_s"] / cpp["decode_tok_s"], 3)
    return groups


if __name__ == "__main__":
    main()
