"""Tensor parallel against one GPU and data parallel, same host, same run (issue 17).

Per model (``dummy:llama-8b`` and ``dummy:smollm2-1.7b``, random weights, bf16, uncompressed) and per
layout — ``tp1`` (one GPU), ``tp2`` (one engine over two GPUs, its all-reduces as the server's default
``--tensor-parallel-all-reduce auto`` makes them: one-shot over symmetric memory at decode sizes), ``tp2-nccl``
(the same with NCCL's alone) and ``dp2`` (two one-GPU engines side by side, each given half the concurrent
requests); decode steps compiled as the server's ``--compile-decode auto`` does on CUDA, or not with an
``-eager`` suffix (``tp1-eager``, ``tp2-eager``, ``tp2-nccl-eager``) — every engine is made by the server's
builder (``Engines.build``), in a process of its own:
  1. correctness: logits of a whole-prompt forward (an eager prefill), logits of 16 teacher-forced decode
     steps (8 prompts together, then one alone: the compiled step's two graphs where compiled) and 64 greedy
     tokens of 8 prompts, compared with tp1 (and tp1's whole-prompt logits with Hugging Face's float32
     model on the same weights, unless ``--no-reference``);
  2. batch-1 ms per decode step (host-timed step, as gpu_bench);
  3. the engine (AsyncLLM) at 1/16/64/256 concurrent requests of 128 prompt + 128 new tokens (EOS ignored).
Needs two CUDA GPUs::

    python -m load_tests.tp_bench --tokenizer TOK_DIR --out load_tests/results/tensor_parallel
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MODELS = {"8b": "dummy:llama-8b", "1.7b": "dummy:smollm2-1.7b"}
LAYOUTS = ("tp1", "tp1-eager", "tp2", "tp2-eager", "tp2-nccl", "tp2-nccl-eager", "dp2")
CONCURRENCY = (1, 16, 64, 256)
PROBE_PROMPTS, GREEDY_TOKENS, DECODE_STEPS = 8, 64, 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def engine_settings(args: argparse.Namespace, **sizes: Any) -> Any:
    """The settings of a benchmarked engine: ``args``' model, tokenizer, tensor-parallel size, all-reduce and
    compiled steps; random weights in bf16, uncompressed, generation only; ``sizes`` the rest."""
    from server.config import Settings

    return Settings(
        compile_decode=args.compile_decode,
        gen_model=args.model,
        tokenizer=args.tokenizer,
        enable_classify=False,
        gen_quantize="none",
        gen_prune=0,
        tensor_parallel_size=args.tp,
        tensor_parallel_all_reduce=args.all_reduce,
        **sizes,
    )


def worker(args: argparse.Namespace) -> None:
    """One engine (rank 0 of ``--tp`` ranks) built by the server's builder; results as JSON to ``--json``."""
    import torch

    from engine.protocol import AddRequest
    from engine.sequence import SamplingParams, Sequence
    from load_tests.gpu_bench import NEW_TOKENS, PROMPT_LEN, engine_level, pct, random_prompts
    from server.runtime import Engines

    levels = tuple(int(c) for c in args.concurrency.split(","))
    settings = engine_settings(
        args,
        max_num_seqs=max(*levels, PROBE_PROMPTS),  # the decode probe steps 8 rows together
        max_batched_tokens=8192,
        max_input_tokens=PROMPT_LEN,
        max_new_tokens=NEW_TOKENS + 64,
        kv_cache_tokens=max(levels) * (PROMPT_LEN + NEW_TOKENS) + 1024,
        cache_dir=Path(args.cache_dir),
    )
    start = time.perf_counter()
    built = Engines.build(settings)
    engine = built.engine
    assert engine is not None
    policy = built.served.policy
    result: dict[str, Any] = {
        "build_s": time.perf_counter() - start,
        "graphs": len(engine.runner.decode.graphs),
        "compiled": engine.runner.decode.compiled,
        "compile_decode": f"{policy.compile_decode} ({policy.why.get('compile_decode', 'as set')})",
    }
    if args.tp > 1:  # what the ranks set up, not what was asked for (a failed setup falls back to NCCL)
        result["all_reduce"] = engine.runner.model.layers[0].mlp.down_proj.all_reduce.describe()
    log(
        f"{args.model} tp={args.tp}: built in {result['build_s']:.0f} s; compiled steps: {result['compiled']}; "
        f"all-reduce: {result.get('all_reduce', '-')}"
    )
    vocab = engine.runner.model.args.vocab_size
    runner = engine.runner
    if args.probe:
        prompts = random_prompts(PROBE_PROMPTS, PROMPT_LEN, vocab, seed=7)
        logits = []
        for prompt in prompts:  # whole-prompt forwards, sent to the other ranks like any step
            seq = Sequence(prompt_ids=prompt, params=SamplingParams())
            engine.blocks.allocate(seq)
            step = runner._host_inputs([seq])
            runner._send(step)
            ids, positions, meta, last = runner._device_inputs(step)
            with torch.inference_mode():
                hidden = runner.model(ids, positions, meta, (runner.k_cache, runner.v_cache))
                logits.append(runner.model.logits(hidden[0, last[0]]).float().cpu())
            engine.blocks.free(seq)
        decode_logits = forced_decode(engine.runner, prompts)
        engine.eos_ids = set()
        for i, prompt in enumerate(prompts):
            engine.add(AddRequest(i, prompt, SamplingParams(max_tokens=GREEDY_TOKENS), f"probe-{i}"))
        greedy: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        while engine.has_work():
            for out in engine.step():
                greedy[out.key].append(out.token)
        probe = {"logits": torch.stack(logits), "decode_logits": decode_logits}
        probe["greedy"] = [greedy[i] for i in range(len(prompts))]
        if args.tp == 1 and args.reference:
            probe["fp32"] = fp32_reference(settings, prompts)
        torch.save(probe, args.probe)
    result["batch1"] = batch1(engine, random_prompts(1, PROMPT_LEN, vocab, seed=2)[0], pct)
    log(f"  batch-1 step p50 {result['batch1']['step_ms_p50']:.2f} ms")
    if args.barrier:  # data parallel: both engines start the load together
        Path(f"{args.barrier}.{os.environ.get('CUDA_VISIBLE_DEVICES')}").touch()
        while len(list(Path(args.barrier).parent.glob(Path(args.barrier).name + ".*"))) < 2:
            time.sleep(0.05)
    result["levels"] = engine_level(engine, vocab, levels, gil_ab=False)
    Path(args.json).write_text(json.dumps(result))


def forced_decode(runner: Any, prompts: list[list[int]], steps: int = DECODE_STEPS) -> Any:
    """Logits of teacher-forced decode steps through ``runner``'s decode graphs (compiled where compiled), sent
    to the other ranks like any step: the prompts prefilled together, ``steps`` steps of all of them (one batch
    bucket), then ``steps`` of the first alone (batch 1); each row fed the same made-up tokens in every layout,
    so every layout's steps see the same inputs. [2 * steps, rows, vocab], float32 on the host; rows a step did
    not run are zeros. Also the compiled-TP test's reference (tests/test_tensor_parallel_compiled.py)."""
    import torch

    from engine.sequence import SamplingParams, Sequence
    from engine.tp import Decode

    blocks, vocab = runner.blocks, runner.model.args.vocab_size
    seqs = [Sequence(prompt_ids=p, params=SamplingParams()) for p in prompts]
    for s in seqs:
        blocks.allocate(s)
    runner.run(seqs)  # the prefill step

    def advance(rows: list[Any], step: int) -> None:
        for i, s in enumerate(rows):
            s.output_ids.append((31 * step + 7 * i + 3) % vocab)
            s.num_computed = s.num_tokens - 1
            blocks.allocate(s)

    advance(seqs, 0)
    found = torch.zeros(2 * steps, len(seqs), vocab)
    for step in range(2 * steps):
        rows = seqs if step < steps else seqs[:1]
        decode = Decode(*runner.decode.stage(rows))
        runner._send(decode)
        with torch.inference_mode():
            _, logits = runner.decode.replay(decode.batch, decode.kv_len, decode.width)
        found[step, : len(rows)] = logits[: len(rows)].float().cpu()
        advance(rows, step + 1)
    for s in seqs:
        blocks.free(s)
    return found


def batch1(engine: Any, prompt: list[int], pct: Any, steps: int = 128) -> dict[str, Any]:
    """Host-timed decode steps of one sequence (each step ends when its token is on the host), through the
    runner as the engine calls it, so the other ranks take part (a graph replayed alone would wait for them)."""
    from engine.sequence import SamplingParams, Sequence

    seq = Sequence(prompt_ids=prompt, params=SamplingParams())
    engine.blocks.allocate(seq)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        token = engine.runner.run([seq])[0]
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
        seq.output_ids.append(token)
        seq.num_computed = seq.num_tokens - 1
        engine.blocks.allocate(seq)
    engine.blocks.free(seq)
    return {"step_ms_p50": pct(times, 0.5), "step_ms_p99": pct(times, 0.99)}


def fp32_reference(settings: Any, prompts: list[list[int]]) -> Any:
    """Last-position logits of Hugging Face's model in float32 on the same random weights: the yardstick for
    how far bf16 (one GPU or split) strays."""
    import torch
    from transformers import AutoModelForCausalLM

    from models.loader import load_causal_lm

    # The engine's bf16 weights, upcast: random weights drawn in float32 would be other numbers.
    loaded = load_causal_lm(settings.gen_model, settings.cache_dir, torch.bfloat16, settings.tokenizer)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    hf.load_state_dict({k: v.float() for k, v in loaded.state_dict.items()})
    with torch.inference_mode():
        out = [hf(torch.tensor([p], device="cuda")).logits[0, -1].float().cpu() for p in prompts]
    del hf
    torch.cuda.empty_cache()
    return torch.stack(out)


def run_layout(model: str, layout: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    base = [sys.executable, "-m", "load_tests.tp_bench", "--worker", "--model", MODELS[model]]
    base += ["--tokenizer", args.tokenizer, "--cache-dir", args.cache_dir]
    name = f"{model}-{layout}"
    if layout != "dp2":
        tp, *options = layout.removeprefix("tp").split("-")
        all_reduce = "nccl" if "nccl" in options else "auto"
        compile_decode = "off" if "eager" in options else "auto"
        cmd = [*base, "--tp", tp, "--all-reduce", all_reduce, "--compile-decode", compile_decode]
        cmd += ["--concurrency", args.concurrency, "--json", str(out / f"{name}.json")]
        cmd += ["--probe", str(probes(args) / f"{name}.pt")]
        if not args.reference:
            cmd.append("--no-reference")
        # A layout that hangs (ranks waiting at a collective) ends at the timeout; the next layouts still run.
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
        subprocess.run(cmd, check=True, env=env, timeout=args.layout_timeout)
        return json.loads((out / f"{name}.json").read_text())
    half = ",".join(str(max(int(c) // 2, 1)) for c in args.concurrency.split(","))
    barrier = out / f"{name}.barrier"
    procs = []
    for gpu in ("0", "1"):
        cmd = [*base, "--tp", "1", "--concurrency", half, "--json", str(out / f"{name}-gpu{gpu}.json")]
        cmd += ["--barrier", str(barrier)]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"{name} worker failed")
    parts = [json.loads((out / f"{name}-gpu{gpu}.json").read_text()) for gpu in ("0", "1")]
    levels = []
    for i, c in enumerate(args.concurrency.split(",")):
        a, b = parts[0]["levels"][i], parts[1]["levels"][i]
        # One request occupies one engine: the other's c=1 run stands for a second user, not this one.
        rate = a["output_tokens_per_s"] if int(c) == 1 else a["output_tokens_per_s"] + b["output_tokens_per_s"]
        levels.append(
            {
                "concurrency": int(c),
                "output_tokens_per_s": rate,
                "itl_ms": {"p50": max(a["itl_ms"]["p50"], b["itl_ms"]["p50"])},
                "ttft_ms": {"p50": max(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"])},
                "per_gpu_concurrency": a["concurrency"],
            }
        )
    return {"batch1": parts[0]["batch1"], "levels": levels, "parts": parts}


def probes(args: argparse.Namespace) -> Path:
    """Where the layouts' logits go (tens of MB: beside the cache, not with the results)."""
    path = Path(args.cache_dir) / "tp_bench_probes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compare(path: Path, model: str, layout: str) -> dict[str, Any]:
    """``layout`` (a tp2 variant) against tp1: whole-prompt and decode-step logits (relative error, top-1),
    greedy tokens; tp1's whole-prompt logits against float32 when run."""
    import torch

    ref, tp2 = torch.load(path / f"{model}-tp1.pt"), torch.load(path / f"{model}-{layout}.pt")
    a, b = tp2["logits"].double(), ref["logits"].double()

    def rel(x: Any, y: Any) -> float:
        return float((x - y).norm() / y.norm())

    agree = []
    for x, y in zip(tp2["greedy"], ref["greedy"], strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(y))
        agree.append(n)
    # Decode steps: the rows each step ran (all rows for the first half, the first row alone after).
    steps, rows = ref["decode_logits"].shape[:2]
    half = steps // 2

    def ran(x: Any) -> Any:
        return torch.cat([x[:half].flatten(0, 1), x[half:, 0]]).double()

    da, db = ran(tp2["decode_logits"]), ran(ref["decode_logits"])
    found = {
        "tp2_vs_tp1_rel_err": rel(a, b),
        "tp2_vs_tp1_top1": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
        "decode_steps_rel_err": rel(da, db),
        "decode_steps_batch1_rel_err": rel(da[half * rows :], db[half * rows :]),
        "decode_steps_top1": float((da.argmax(-1) == db.argmax(-1)).double().mean()),
        "greedy_tokens_identical_before_first_difference": agree,
    }
    if "fp32" in ref:
        fp32 = ref["fp32"].double()
        found |= {
            "tp1_bf16_vs_hf_fp32_rel_err": rel(b, fp32),
            "tp2_bf16_vs_hf_fp32_rel_err": rel(a, fp32),
            "tp1_top1_vs_fp32": float((b.argmax(-1) == fp32.argmax(-1)).double().mean()),
            "tp2_top1_vs_fp32": float((a.argmax(-1) == fp32.argmax(-1)).double().mean()),
        }
    return found


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Tensor parallel vs one GPU vs data parallel (issue 17)",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; device: {results['device']}; host: {results['host']}",
        "- models: random weights, bf16, uncompressed; engines built by `Engines.build`; load: the engine's own "
        "AsyncLLM in process (no HTTP), 128 prompt + 128 new tokens per request, EOS ignored",
        "- dp2: two one-GPU engines in two processes started together, each given half the concurrent requests; "
        "its throughput is their sum",
        "",
    ]
    levels = results["concurrency"]
    for model, r in results["models"].items():
        lines += [
            f"## {model}",
            "",
            "| layout | batch-1 ms/step | " + " | ".join(f"c={c} tok/s" for c in levels) + " |",
            "|---|---|" + "---|" * len(levels),
        ]
        for layout in LAYOUTS:
            lay = r.get(layout)
            if lay is None:
                continue
            tps = " | ".join(f"{lv['output_tokens_per_s']:,.0f}" for lv in lay["levels"])
            lines.append(f"| {layout} | {lay['batch1']['step_ms_p50']:.2f} | {tps} |")
        for layout in (lay for lay in LAYOUTS if lay.startswith("tp2")):
            if "tp1" in r and layout in r:
                ratio = r[layout]["batch1"]["step_ms_p50"] / r["tp1"]["batch1"]["step_ms_p50"]
                tp1_top = r["tp1"]["levels"][-1]["output_tokens_per_s"]
                top = r[layout]["levels"][-1]["output_tokens_per_s"] / tp1_top
                lines += [
                    "",
                    f"{layout}/tp1 (all-reduce: {r[layout].get('all_reduce')}; compiled steps: "
                    f"{r[layout].get('compiled')}, tp1's: {r['tp1'].get('compiled')}): batch-1 step time {ratio:.2f}x; "
                    f"c={r[layout]['levels'][-1]['concurrency']} throughput {top:.2f}x",
                ]
        for layout, check in r.get("check", {}).items():
            lines += ["", f"{layout} vs tp1 correctness: `{json.dumps(check)}`"]
        lines += ["", *(f"{k.removesuffix('_error')} failed: `{v}`" for k, v in r.items() if k.endswith("_error"))]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", help="results directory (required)")
    parser.add_argument("--cache-dir", default="/tmp/lowlat-tp-cache")
    parser.add_argument("--models", default="8b,1.7b")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument(
        "--no-reference", dest="reference", action="store_false", help="skip Hugging Face's float32 logits"
    )
    parser.add_argument("--layout-timeout", type=float, help="seconds a tp layout may take (default: no limit)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--all-reduce", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--compile-decode", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.out:
        parser.error("--out is required")
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}",
        "host": f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "concurrency": [int(c) for c in args.concurrency.split(",")],
        "models": {},
    }
    for model in args.models.split(","):
        r = results["models"].setdefault(model, {})
        for stale in probes(args).glob(f"{model}-*.pt"):  # an earlier run's, which a failed layout would leave
            stale.unlink()
        for layout in args.layouts.split(","):
            log(f"== {model} {layout}")
            try:
                r[layout] = run_layout(model, layout, args, out)
            except Exception as e:  # keep the other layouts' figures; the failure is in the results
                r[layout + "_error"] = repr(e)
                log(f"   failed: {e!r}")
            if layout.startswith("tp2") and layout in r and (probes(args) / f"{model}-tp1.pt").exists():
                r.setdefault("check", {})[layout] = compare(probes(args), model, layout)
            # After every layout: a run cut short keeps what it measured.
            (out / "results.json").write_text(json.dumps(results, indent=1))
            (out / "results.md").write_text(markdown(results))
    log("done")


if __name__ == "__main__":
    main()
