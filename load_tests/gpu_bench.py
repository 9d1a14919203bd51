"""GPU benchmark: our engine against Hugging Face transformers, same random weights, same GPU, one run.

Per generation model (S = dummy:smollm2-135m, L = dummy:smollm2-1.7b), in this order:
  1. correctness: prefill and decode (CUDA-graph) logits vs HF in bf16 and fp32, greedy continuations;
  2. our batch-1 ms/step (host-timed step, and the graph replay alone timed with CUDA events);
  3. our engine (AsyncLLM: scheduler, runner, detokenizer, asyncio streams) at 1/16/64/256 concurrent
     requests of 128 prompt + 128 new tokens: tokens/s, TTFT and ITL p50/p99, share of time in the model;
  4. HF ``generate`` batch 1 (ms/step), static batch 128 and continuous batching (``generate_batch``, 256
     requests) on the same weights and requests;
  5. our server on loopback driven by load_tests/loadgen/ (whole and streamed /generate).
Then /classify (MiniLM-L6 architecture, random weights, fp16) through HTTP at 1/64/256 clients against
one forward per request in process.

Needs CUDA. Writes ``results.json`` and ``results.md`` under ``--out``::

    python -m load_tests.gpu_bench --tokenizer TOK_DIR --encoder-tokenizer MINILM_TOK_DIR \\
        --out load_tests/results/gpu [--quick] [--models S,L]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from engine.llm_engine import AsyncLLM, EngineConfig, LLMEngine
from engine.sequence import SamplingParams, Sequence
from load_tests.loadgen import make_scenario, run_sweep_sync
from load_tests.ready_time import stop_server
from models.llama import Llama
from models.loader import DUMMY_SEED, load_causal_lm
from models.sources import PRESETS

MODELS = {"S": "dummy:smollm2-135m", "L": "dummy:smollm2-1.7b"}
PROMPT_LEN, NEW_TOKENS = 128, 128
CONCURRENCY = (1, 16, 64, 256)
CLS_CONCURRENCY = (1, 64, 256)
HF_STATIC_BATCH, HF_CB_REQUESTS = 128, 256
DEV = torch.device("cuda")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def engine_config(max_num_seqs: int = 256) -> EngineConfig:
    """Sized for the runs below: every request fits, nothing is preempted."""
    return EngineConfig(
        max_num_seqs=max_num_seqs,
        max_batched_tokens=8192,
        kv_cache_tokens=max_num_seqs * (PROMPT_LEN + NEW_TOKENS) + 1024,
        block_size=16,
        max_model_len=PROMPT_LEN + NEW_TOKENS + 128,
    )


# ------------------------------------------------------------------------------------------ correctness


def correctness(engine: LLMEngine, hf: Any, hf32: Any, vocab: int, steps: int, batch: int = 4) -> dict[str, Any]:
    """Logits of our prefill (eager) and decode (CUDA graphs) of ``batch`` prompts against HF bf16 and an fp32
    reference."""
    runner = engine.runner
    prompts = random_prompts(batch, PROMPT_LEN, vocab, seed=1)
    seqs = [Sequence(prompt_ids=list(p), params=SamplingParams()) for p in prompts]
    for s in seqs:
        engine.blocks.allocate(s)
    with torch.inference_mode():
        ids, positions, meta, _ = runner._prepare(seqs)
        ours_prefill = runner.model.logits(runner.model(ids, positions, meta, (runner.k_cache, runner.v_cache)))
        for s in seqs:
            s.num_computed = s.num_tokens  # cache now holds the prompts
        decode_logits = []
        for step in range(steps):
            if step == 0:  # first token from the prefill's last row
                tokens = ours_prefill[:, -1].argmax(-1).tolist()
            else:
                greedy, logits = runner.decode.run(seqs)
                decode_logits.append(logits.clone())
                tokens = greedy.tolist()
            for s, t in zip(seqs, tokens, strict=True):
                s.output_ids.append(t)
                s.num_computed = s.num_tokens - 1
                engine.blocks.allocate(s)
        ours_decode = torch.stack(decode_logits, dim=1)  # [b, steps-1, vocab]: predicts token 2..steps
        full = torch.tensor([s.prompt_ids + s.output_ids for s in seqs], device=DEV)
        ref32 = hf32(full).logits.float()
        ref16 = hf(full).logits.float()
        hf_gen = hf.generate(
            torch.tensor(prompts, device=DEV),
            attention_mask=torch.ones(len(prompts), PROMPT_LEN, dtype=torch.long, device=DEV),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
        )[:, PROMPT_LEN:].tolist()
    ours_tokens = [s.output_ids for s in seqs]
    for s in seqs:
        engine.blocks.free(s)
    # Decode logits at step k (k >= 1) predict output token k: positions PROMPT_LEN + k - 1 of the full sequence.
    dec_slice = slice(PROMPT_LEN, PROMPT_LEN + steps - 1)
    ref32_greedy = ref32[:, PROMPT_LEN - 1 : PROMPT_LEN + steps - 1].argmax(-1).tolist()

    def agree(a: list[list[int]], b: list[list[int]]) -> list[int]:
        return [
            next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), len(p))
            for p, q in zip(a, b, strict=True)
        ]

    top2 = ref32[:, PROMPT_LEN - 1 : PROMPT_LEN + steps - 1].topk(2, dim=-1).values
    return {
        "prompts": len(prompts),
        "prompt_tokens": PROMPT_LEN,
        "steps": steps,
        "prefill_rel_err_vs_fp32": {
            "ours_bf16": rel_err(ours_prefill, ref32[:, :PROMPT_LEN]),
            "hf_bf16": rel_err(ref16[:, :PROMPT_LEN], ref32[:, :PROMPT_LEN]),
        },
        "prefill_rel_err_ours_vs_hf_bf16": rel_err(ours_prefill, ref16[:, :PROMPT_LEN]),
        "decode_rel_err_vs_fp32": {
            "ours_bf16": rel_err(ours_decode, ref32[:, dec_slice]),
            "hf_bf16": rel_err(ref16[:, dec_slice], ref32[:, dec_slice]),
        },
        "decode_rel_err_ours_vs_hf_bf16": rel_err(ours_decode, ref16[:, dec_slice]),
        "prefill_argmax_agreement_ours_vs_fp32": float(
            (ours_prefill.argmax(-1) == ref32[:, :PROMPT_LEN].argmax(-1)).float().mean()
        ),
        "greedy_matching_prefix_ours_vs_hf_generate_bf16": agree(ours_tokens, hf_gen),
        "greedy_matching_prefix_ours_vs_fp32_argmax": agree(ours_tokens, ref32_greedy),
        "fp32_top2_margin_median": float((top2[..., 0] - top2[..., 1]).median()),
    }


# ------------------------------------------------------------------------------------------ our engine


def batch1_step_ms(engine: LLMEngine, vocab: int, steps: int = 128) -> dict[str, Any]:
    """One sequence: host-timed ``runner.run`` per decode step, and the replay of its graph alone."""
    runner = engine.runner
    seq = Sequence(prompt_ids=random_prompts(1, PROMPT_LEN, vocab, seed=2)[0], params=SamplingParams())
    engine.blocks.allocate(seq)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        token = runner.run([seq])[0]
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
        seq.output_ids.append(token)
        seq.num_computed = seq.num_tokens - 1
        engine.blocks.allocate(seq)
    key = (1, runner.decode.kv_lens[-1], 1)
    graph = runner.decode.graphs.get(key)
    replay_ms = None
    if graph is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(200):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / 200
    engine.blocks.free(seq)
    return {
        "step_ms_p50": pct(times, 0.5),
        "step_ms_mean": statistics.fmean(times),
        "graph_replay_ms_at_max_kv_bucket": replay_ms,
    }


def decode_profile(engine: LLMEngine, batch: int, kv_len: int) -> dict[str, Any]:
    """Kernels of one decode step run eagerly (a replay launches the same ones): count, summed GPU time, top 8."""
    from torch.profiler import ProfilerActivity, profile

    decode = engine.runner.decode
    decode.inputs.zero_()
    with torch.inference_mode():
        decode._forward(batch, kv_len)
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode._forward(batch, kv_len)
            sync()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in events:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return {
        "batch": batch,
        "kv_len": kv_len,
        "kernels": len(events),
        "kernel_ms_sum": sum(by_name.values()),
        "top_ms": {name[:80]: ms for name, ms in top},
    }


async def _engine_level(llm: AsyncLLM, prompts: list[list[int]], concurrency: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=NEW_TOKENS)
    ttft, itl, tokens = [], [], 0
    todo = list(enumerate(prompts))

    async def worker() -> None:
        nonlocal tokens
        while todo:
            i, prompt = todo.pop()
            t0 = last = time.perf_counter()
            first = True
            async for chunk in llm.generate(prompt, params, f"bench-{concurrency}-{i}"):
                now = time.perf_counter()
                (ttft if first else itl).append((now - (t0 if first else last)) * 1e3)
                first, last = False, now
                if chunk.finish_reason is not None:
                    tokens += chunk.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99)},
        "itl_ms": {"p50": pct(itl, 0.5), "p99": pct(itl, 0.99)},
    }


def engine_level(engine: LLMEngine, vocab: int, levels: tuple[int, ...], gil_ab: bool) -> list[dict[str, Any]]:
    """Closed loop at each concurrency; every request runs to 128 tokens (EOS ignored, as HF's min_new_tokens).
    ``gil_ab``: the top level again with a 0.5 ms GIL switch interval."""
    engine.eos_ids = set()
    model_s = [0.0]
    run = engine.runner.run

    def timed_run(seqs: list[Sequence]) -> list[int]:
        t0 = time.perf_counter()
        out = run(seqs)
        model_s[0] += time.perf_counter() - t0
        return out

    engine.runner.run = timed_run  # type: ignore[method-assign]
    llm = AsyncLLM(engine)
    llm.start()
    results = []
    try:
        asyncio.run(_engine_level(llm, random_prompts(8, PROMPT_LEN, vocab, seed=3), 8))  # warm-up
        for c in levels:
            prompts = random_prompts(max(2 * c, 4), PROMPT_LEN, vocab, seed=100 + c)
            model_s[0] = 0.0
            r = asyncio.run(_engine_level(llm, prompts, c))
            r["share_of_wall_in_runner"] = model_s[0] / r["wall_s"]
            log(f"  engine c={c}: {r['output_tokens_per_s']:.0f} tok/s, ITL p50 {r['itl_ms']['p50']:.2f} ms")
            results.append(r)
        if not gil_ab:
            return results
        # A/B: the engine thread and this event loop share the GIL; a shorter switch interval than the
        # 5 ms default lets the loop drain token chunks while the engine works.
        default = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        try:
            c = levels[-1]
            model_s[0] = 0.0
            r = asyncio.run(_engine_level(llm, random_prompts(max(2 * c, 4), PROMPT_LEN, vocab, seed=100 + c), c))
            r["share_of_wall_in_runner"] = model_s[0] / r["wall_s"]
            r["gil_switch_interval_s"] = 0.0005
            log(f"  engine c={c}, GIL switch 0.5 ms: {r['output_tokens_per_s']:.0f} tok/s")
            results.append(r)
        finally:
            sys.setswitchinterval(default)
    finally:
        llm.stop()
        engine.runner.run = run  # type: ignore[method-assign]
    return results


# ------------------------------------------------------------------------------------------ HF baselines


def hf_baselines(hf: Any, vocab: int, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prompt = torch.tensor(random_prompts(1, PROMPT_LEN, vocab, seed=4), device=DEV)

    def gen(ids: torch.Tensor, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t0

    gen(prompt, 2)
    n = 32
    t1, tn = gen(prompt, 1), gen(prompt, n + 1)
    out["generate_batch1_ms_per_step"] = (tn - t1) / n * 1e3
    log(f"  HF generate batch 1: {out['generate_batch1_ms_per_step']:.2f} ms/step")
    if quick:
        return out
    batch = torch.tensor(random_prompts(HF_STATIC_BATCH, PROMPT_LEN, vocab, seed=5), device=DEV)
    t = gen(batch, NEW_TOKENS)
    out["generate_static_batch128_tokens_per_s"] = HF_STATIC_BATCH * NEW_TOKENS / t
    log(f"  HF generate static batch 128: {out['generate_static_batch128_tokens_per_s']:.0f} tok/s")
    from transformers import GenerationConfig

    # No EOS (it becomes -1, disabled), so every request runs to max_new_tokens as ours do.
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    inputs = random_prompts(HF_CB_REQUESTS, PROMPT_LEN, vocab, seed=6)
    try:
        sync()
        t0 = time.perf_counter()
        results = hf.generate_batch(inputs=inputs, generation_config=cfg, progress_bar=False)
        sync()
        t = time.perf_counter() - t0
        tokens = sum(len(r.generated_tokens) for r in results.values())
        out["generate_batch_256_tokens_per_s"] = tokens / t
        out["generate_batch_256_output_tokens"] = tokens
        out["generate_batch_256_errors"] = sum(r.error is not None for r in results.values())
        log(f"  HF generate_batch 256: {out['generate_batch_256_tokens_per_s']:.0f} tok/s")
    except Exception as exc:  # record, don't lose the rest of the run
        out["generate_batch_error"] = f"{type(exc).__name__}: {exc}"
        log(f"  HF generate_batch failed: {exc}")
    return out


# ------------------------------------------------------------------------------------------ HTTP


def start_server(env: dict[str, str], port: int, switch_interval: float | None = None) -> subprocess.Popen[str]:
    """``python -m server``; ``switch_interval`` sets the GIL switch interval first (an A/B: the engine's
    thread holds the GIL while it launches work, and the event loop waits up to the 5 ms default for it)."""
    import httpx

    full_env = {**os.environ, **env, "LLM_PORT": str(port), "LLM_LOG_LEVEL": "warning", "LLM_DEVICE": DEV.type}
    cmd = [sys.executable, "-m", "server"]
    if switch_interval is not None:
        code = f"import runpy, sys; sys.setswitchinterval({switch_interval}); "
        code += "runpy.run_module('server', run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    proc = subprocess.Popen(cmd, env=full_env, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        if ready.status_code == 200:
            return proc
        if ready.json().get("status") == "failed":  # load failed: no point waiting out the deadline
            proc.kill()
            raise RuntimeError(f"server failed to load: {ready.json().get('error')}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready in 300 s")


HISTOGRAMS = ("llm_batch_size_", "llm_engine_step_seconds_", "llm_queue_time_seconds_")
COUNTERS = (
    "llm_prefix_cache_queried_tokens_total",
    "llm_prefix_cache_hit_tokens_total",
    "llm_response_cache_hits_total",
)


def scrape(port: int) -> dict[str, float]:
    """Sums and counts of the server's batch-size, step-time and queue-time histograms, and its prefix- and
    response-cache counters (cumulative)."""
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        name = line.split(" ")[0]
        if (name.startswith(HISTOGRAMS) and ("_sum" in name or "_count" in name)) or name.startswith(COUNTERS):
            out[name] = float(line.split(" ")[-1])
    return out


def server_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-level means from two scrapes: batch size, step ms by phase, queue ms; cache counters and the
    prefix-cache hit rate (hit / queried prompt tokens: the benchmark measures batching, not caching)."""
    diff = {k: after[k] - before.get(k, 0.0) for k in after}
    stats = {k: v for k, v in diff.items() if k.startswith(COUNTERS)}
    queried = diff.get("llm_prefix_cache_queried_tokens_total", 0.0)
    if queried > 0:
        stats["prefix cache hit rate"] = diff.get("llm_prefix_cache_hit_tokens_total", 0.0) / queried
    for key, count in diff.items():
        if "_count" in key and count > 0:
            total = diff.get(key.replace("_count", "_sum"), 0.0)
            scale = 1e3 if "seconds" in key else 1.0
            stats["mean " + key.replace("_count", "")] = total / count * scale
            stats["n " + key.replace("_count", "")] = count
    return stats


def text_prompts(tokenizer: Any, n: int) -> list[str]:
    """~128-token prompts: overlapping windows of the evaluation + calibration texts, each starting at a
    different token (up to ~7,000 windows), so two prompts share no prefix block unless drawn twice."""
    text = Path("data/eval.txt").read_text() + "\n" + Path("data/calibration.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = [(i * 61) % (len(ids) - PROMPT_LEN) for i in range(n)]
    return [" ".join(tokenizer.decode(ids[i : i + PROMPT_LEN]).split()) for i in starts]


def summarize(level: Any) -> dict[str, Any]:
    s = level.summary.to_dict() if hasattr(level, "summary") else level.to_dict()
    s.pop("ttft_samples_ms", None)
    return s


def _http_levels(port: int, scenario: Any, levels: tuple[int, ...], what: str, requests: Any) -> list[dict[str, Any]]:
    """One closed-loop sweep per level, each with its own body seed (the same seed would replay the same
    prompts at every level, which the server's prefix cache would then partly answer)."""
    res = []
    for c in levels:
        before = scrape(port)
        sweep = run_sweep_sync(
            f"http://127.0.0.1:{port}",
            scenario,
            concurrencies=[c],
            requests=requests(c),
            duration=30,
            seed=zlib.crc32(f"{what}:{c}".encode()),
            timeout=120,
            warmup=4 if c == levels[0] else 0,
        )
        s = summarize(sweep.levels[0])
        s["server"] = server_stats(before, scrape(port))
        log(
            f"  HTTP {what} c={c}: {s['output_tokens_per_s']:.0f} tok/s, {s['throughput_rps']:.0f} req/s, "
            f"p99 {s['latency_ms']['p99']:.0f} ms, errors {s['errors']}, server {s['server']}"
        )
        res.append(s)
    return res


def http_generate(
    spec: str, tokenizer_dir: str, tokenizer: Any, levels: tuple[int, ...], ab_levels: tuple[int, ...]
) -> dict[str, Any]:
    """Whole and streamed /generate at each level; then, at ``ab_levels``, whole again with a 0.5 ms GIL
    switch interval."""
    env = {
        "LLM_GEN_MODEL": spec,
        "LLM_TOKENIZER": tokenizer_dir,
        "LLM_ENABLE_CLASSIFY": "false",
        "LLM_DTYPE": "bfloat16",
        "LLM_MAX_NUM_SEQS": "256",
        "LLM_MAX_BATCHED_TOKENS": "8192",
        "LLM_KV_CACHE_TOKENS": str(256 * (2 * PROMPT_LEN + NEW_TOKENS) + 1024),
        "LLM_MAX_INPUT_TOKENS": str(2 * PROMPT_LEN),
        "LLM_MAX_NEW_TOKENS": str(NEW_TOKENS),
        "LLM_DEFAULT_MAX_TOKENS": str(NEW_TOKENS),
        "LLM_MAX_CONCURRENT_STREAMS": "256",  # every streamed client admitted (default 64; the rest would get 429)
    }
    port = 8765
    prompts = text_prompts(tokenizer, 4096)  # distinct starts: few repeats among the ~1,400 requests
    out: dict[str, Any] = {}
    for switch in (None, 0.0005) if ab_levels else (None,):
        t0 = time.perf_counter()
        proc = start_server(env, port, switch)
        out.setdefault("server_startup_s", time.perf_counter() - t0)
        try:
            for name in ("generate", "generate-stream") if switch is None else ("generate",):
                key = name if switch is None else f"{name} (GIL switch 0.5 ms)"
                scenario = make_scenario(name, prompts=prompts, max_tokens=NEW_TOKENS)
                out[key] = _http_levels(
                    port, scenario, levels if switch is None else ab_levels, key, lambda c: max(2 * c, 8)
                )
        finally:
            stop_server(proc)
    return out


# ------------------------------------------------------------------------------------------ classification


def dummy_encoder_dir(tokenizer_dir: Path) -> Path:
    """The dummy:minilm-l6 weights (same seed as models/loader.py) saved with the carried tokenizer files."""
    from transformers import AutoModel

    config = PRESETS["minilm-l6"]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DUMMY_SEED)
        model = AutoModel.from_config(copy.deepcopy(config))
    out = Path(tempfile.mkdtemp(prefix="minilm-dummy-"))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def classification(tokenizer_dir: Path, levels: tuple[int, ...], gil_ab: bool) -> dict[str, Any]:
    from engine.classifier import Classifier, ClassifyItem
    from load_tests.loadgen import BUILTIN_PROMPTS, as_text
    from models.loader import load_encoder

    model_dir = dummy_encoder_dir(tokenizer_dir)
    encoder = load_encoder(str(model_dir), Path(tempfile.mkdtemp()), torch.float16)
    clf = Classifier(encoder, DEV)
    texts = [as_text(p) for p in BUILTIN_PROMPTS]
    labels = ("billing", "shipping", "refund", "account", "technical support", "other")
    # As the server queues them: with the token ids the API server found while checking the limits.
    ids = clf.token_ids(texts)
    items = [ClassifyItem(t, labels, False, len(r), ids=tuple(r)) for t, r in zip(texts, ids, strict=True)]
    for item in items:  # warm-up
        clf.run([item])
    lat = []
    t0 = time.perf_counter()
    for i in range(300):
        s = time.perf_counter()
        clf.run([items[i % len(items)]])
        lat.append((time.perf_counter() - s) * 1e3)
    one = {"requests_per_s": 300 / (time.perf_counter() - t0), "latency_ms_p50": pct(lat, 0.5)}
    log(f"  classify one forward per request: {one['requests_per_s']:.0f} req/s")
    del clf, encoder
    env = {
        "LLM_CLS_MODEL": str(model_dir),
        "LLM_ENABLE_GENERATE": "false",
        "LLM_DTYPE": "float16",
        "LLM_CLS_MAX_BATCH_SIZE": "256",
        "LLM_CLS_MAX_BATCH_TOKENS": "16384",
        "LLM_CLS_MAX_WAIT_MS": "2",
        "LLM_CLS_CACHE_SIZE": "0",  # the load generator repeats ~22 texts: measure batching, not the response cache
    }
    port = 8766
    scenario = make_scenario("classify", labels=list(labels))
    out: dict[str, Any] = {"one_forward_per_request_in_process": one}
    runs = [(None, "http", levels)] + ([(0.0005, "http (GIL switch 0.5 ms)", levels[1:])] if gil_ab else [])
    for switch, key, lv in runs:
        proc = start_server(env, port, switch)
        try:
            out[key] = _http_levels(port, scenario, lv, f"classify {key}", lambda c: max(300, 10 * c))
        finally:
            stop_server(proc)
    return out


# ------------------------------------------------------------------------------------------ main


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    spec = MODELS[name]
    log(f"{name}: loading {spec}")
    loaded = load_causal_lm(spec, Path(tempfile.mkdtemp()), torch.bfloat16, args.tokenizer)
    vocab = loaded.config.vocab_size
    model = Llama.from_hf(loaded.config, loaded.state_dict).to(DEV)
    t0 = time.perf_counter()
    engine = LLMEngine(model, loaded.tokenizer, DEV, torch.bfloat16, engine_config())
    capture_s = time.perf_counter() - t0
    log(f"  engine built, {len(engine.runner.decode.graphs)} graphs captured in {capture_s:.1f} s")
    with DEV:  # random init on the GPU is fast; the weights are overwritten below
        hf = AutoModelForCausalLM.from_config(copy.deepcopy(loaded.config), dtype=torch.bfloat16)
    missing, unexpected = hf.load_state_dict(loaded.state_dict, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    hf = hf.to(DEV).eval()
    hf32 = copy.deepcopy(hf).float()
    result: dict[str, Any] = {"spec": spec, "graphs": len(engine.runner.decode.graphs), "capture_s": capture_s}
    result["paged_decode_kernel"] = engine.runner.decode.paged_kernel_error or "in use"
    log(f"  paged decode kernel: {result['paged_decode_kernel']}")
    result["correctness"] = correctness(engine, hf, hf32, vocab, steps=min(32, NEW_TOKENS))
    log(f"  correctness: {json.dumps(result['correctness'])}")
    del hf32
    torch.cuda.empty_cache()
    result["ours_batch1"] = batch1_step_ms(engine, vocab, steps=NEW_TOKENS)
    log(f"  ours batch 1: {result['ours_batch1']}")
    if DEV.type == "cuda":
        result["decode_profile"] = [decode_profile(engine, b, PROMPT_LEN + NEW_TOKENS) for b in (1, 256)]
        log(f"  decode profile: {json.dumps(result['decode_profile'])}")
    levels = CONCURRENCY[:2] if args.quick else CONCURRENCY
    result["ours_engine"] = engine_level(engine, vocab, levels, args.gil_ab)
    result["hf"] = hf_baselines(hf, vocab, args.quick)
    tokenizer = loaded.tokenizer
    del engine, model, hf, loaded
    gc.collect()  # the engine's graphs and KV cache hold most of the GPU
    torch.cuda.empty_cache()
    if not args.skip_http:
        levels = CONCURRENCY[:2] if args.quick else CONCURRENCY
        ab_levels = CONCURRENCY[-2:] if args.gil_ab and not args.quick and name == "S" else ()
        try:
            result["ours_http"] = http_generate(spec, args.tokenizer, tokenizer, levels, ab_levels)
        except Exception as exc:  # the engine-level results above still count
            log(f"{name} HTTP failed: {type(exc).__name__}: {exc}")
            result["ours_http_error"] = f"{type(exc).__name__}: {exc}"
    return result


TARGETS = {"S": {"batch1_ms": 0.6, "c256_tok_s": 40_000}, "L": {"batch1_ms": 1.5, "c256_tok_s": 20_000}}


def _f(x: Any, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def _server(s: dict[str, Any], key: str) -> Any:
    return next((v for k, v in s.get("server", {}).items() if k.startswith(f"mean {key}")), None)


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"# GPU benchmark: our engine vs Hugging Face transformers ({env['gpu']}, {env['date']})",
        "",
        f"Command: `{env['command']}`  ",
        f"torch {env['torch']}, transformers {env['transformers']}, {env['cpus']} host CPUs; bf16 (classification "
        f"fp16); random weights; requests of {PROMPT_LEN} prompt + {NEW_TOKENS} new tokens (EOS ignored on both "
        "sides at engine level).",
        "",
        "## Targets (issue 5)",
        "",
        "| model | batch-1 ms/step (target) | x HF generate | engine tok/s at 256 (target) | x HF generate_batch "
        "| HTTP whole tok/s at 256 (share of engine, target 60%) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        t, hf = TARGETS.get(name, {}), r["hf"]
        b1 = r["ours_batch1"]["step_ms_p50"]
        e256 = next((e for e in r["ours_engine"] if e["concurrency"] == 256 and "gil_switch_interval_s" not in e), None)
        h256 = next((h for h in r.get("ours_http", {}).get("generate", []) if h["concurrency"] == 256), None)
        eng = e256["output_tokens_per_s"] if e256 else None
        cb = hf.get("generate_batch_256_tokens_per_s")
        lines.append(
            f"| {name} | {b1:.2f} ({t.get('batch1_ms')}) | {hf['generate_batch1_ms_per_step'] / b1:.0f}x | "
            f"{_f(eng, '.0f')} ({t.get('c256_tok_s')}) | {_f(eng / cb if eng and cb else None, '.1f')}x | "
            f"{_f(h256['output_tokens_per_s'] if h256 else None, '.0f')} "
            f"({_f(h256['output_tokens_per_s'] / eng * 100 if h256 and eng else None, '.0f')}%) |"
        )
    for name, r in results["models"].items():
        c, b1, hf = r["correctness"], r["ours_batch1"], r["hf"]
        lines += [
            "",
            f"## {name} = {r['spec']}",
            "",
            f"{r['graphs']} decode graphs captured in {r['capture_s']:.1f} s; paged decode kernel: "
            f"{r['paged_decode_kernel']}.",
            "",
            "**Correctness** (4 random prompts; relative L2 error of logits against HF in fp32 on the same weights):",
            "",
            "| | ours bf16 | HF bf16 |",
            "|---|---|---|",
            f"| prefill (eager), all {c['prompt_tokens']} positions | {c['prefill_rel_err_vs_fp32']['ours_bf16']:.2e} "
            f"| {c['prefill_rel_err_vs_fp32']['hf_bf16']:.2e} |",
            f"| decode ({c['steps'] - 1} steps through CUDA graphs) | {c['decode_rel_err_vs_fp32']['ours_bf16']:.2e} "
            f"| {c['decode_rel_err_vs_fp32']['hf_bf16']:.2e} |",
            "",
            f"Greedy continuation ({c['steps']} tokens): tokens equal to HF `generate` (bf16) before the first "
            f"difference, per prompt: {c['greedy_matching_prefix_ours_vs_hf_generate_bf16']}; equal to the fp32 "
            f"argmax: {c['greedy_matching_prefix_ours_vs_fp32_argmax']} (median fp32 top-2 logit margin "
            f"{c['fp32_top2_margin_median']:.3f}: random weights give near-ties, where bf16 rounding decides).",
            "",
            "| | ours | HF |",
            "|---|---|---|",
            f"| batch-1 ms per decode step | {b1['step_ms_p50']:.3f} (graph replay alone "
            f"{_f(b1['graph_replay_ms_at_max_kv_bucket'], '.3f')}) | {hf['generate_batch1_ms_per_step']:.1f} "
            "(`generate`) |",
        ]
        if "generate_static_batch128_tokens_per_s" in hf:
            lines.append(
                f"| static batch 128, tok/s | | {hf['generate_static_batch128_tokens_per_s']:.0f} (`generate`) |"
            )
        if "generate_batch_256_tokens_per_s" in hf:
            lines.append(
                f"| 256 requests, tok/s | see below | {hf['generate_batch_256_tokens_per_s']:.0f} (`generate_batch`, "
                "timing includes its warm-up) |"
            )
        for p in r.get("decode_profile", []):
            top = ", ".join(f"{k.split('(')[0][:40]} {v:.2f}" for k, v in list(p["top_ms"].items())[:4])
            lines.append(
                f"| one decode step, batch {p['batch']}, kv {p['kv_len']}: kernels / summed kernel ms | "
                f"{p['kernels']} / {p['kernel_ms_sum']:.2f} (top: {top}) | |"
            )
        lines += [
            "",
            "**Engine level** (AsyncLLM in process: scheduler, runner, detokenizer, asyncio streams; closed loop, "
            "2 x concurrency requests):",
            "",
            "| concurrency | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | share of wall in the runner |",
            "|---|---|---|---|---|",
        ]
        for e in r["ours_engine"]:
            label = f"{e['concurrency']}" + (" (GIL switch 0.5 ms)" if "gil_switch_interval_s" in e else "")
            lines.append(
                f"| {label} | {e['output_tokens_per_s']:.0f} | {e['ttft_ms']['p50']:.1f} / {e['ttft_ms']['p99']:.1f} "
                f"| {e['itl_ms']['p50']:.2f} / {e['itl_ms']['p99']:.2f} | {e['share_of_wall_in_runner']:.0%} |"
            )
        if "ours_http_error" in r:
            lines += ["", f"**HTTP**: failed ({r['ours_http_error']})."]
        http = r.get("ours_http", {})
        if http:
            lines += [
                "",
                f"**HTTP** (our server on loopback, load_tests/loadgen closed loop, prompts of ~{PROMPT_LEN} tokens "
                f"from data/, max_tokens {NEW_TOKENS}; server start {http.get('server_startup_s', 0):.0f} s; "
                "server columns from its /metrics):",
                "",
                "| run | clients | tok/s | req/s | latency p50 / p99 ms | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
                "errors | server: mean batch | mean prefill step ms | mean decode step ms | prefix-cache hit rate |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for key, levels in http.items():
                if not isinstance(levels, list):
                    continue
                for h in levels:
                    ttft, itl = h.get("ttft_ms") or {}, h.get("itl_ms") or {}
                    prefill = _server(h, 'llm_engine_step_seconds{phase="prefill"')
                    decode = _server(h, 'llm_engine_step_seconds{phase="decode"')
                    lines.append(
                        f"| {key} | {h['concurrency']} | {h['output_tokens_per_s']:.0f} | {h['throughput_rps']:.0f} | "
                        f"{h['latency_ms']['p50']:.0f} / {h['latency_ms']['p99']:.0f} | "
                        f"{_f(ttft.get('p50'))} / {_f(ttft.get('p99'))} | {_f(itl.get('p50'), '.2f')} / "
                        f"{_f(itl.get('p99'), '.2f')} | {h['errors'] or 0} | {_f(_server(h, 'llm_batch_size'))} | "
                        f"{_f(prefill)} | {_f(decode, '.2f')} | "
                        f"{_f(h.get('server', {}).get('prefix cache hit rate'), '.1%')} |"
                    )
    if "classification" in results:
        cl = results["classification"]
        one = cl["one_forward_per_request_in_process"]
        lines += [
            "",
            "## /classify (MiniLM-L6 architecture, fp16, random weights, 6 candidate labels)",
            "",
            f"One forward per request, in process (same Classifier, batch of 1): {one['requests_per_s']:.0f} req/s "
            f"(p50 {one['latency_ms_p50']:.2f} ms).",
            "",
            "| run | clients | req/s | p50 ms | p99 ms | errors | x one-forward | server: mean batch | mean queue ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, levels in cl.items():
            if not isinstance(levels, list):
                continue
            for h in levels:
                lines.append(
                    f"| {key} | {h['concurrency']} | {h['throughput_rps']:.0f} | {h['latency_ms']['p50']:.1f} | "
                    f"{h['latency_ms']['p99']:.1f} | {h['errors'] or 0} | "
                    f"{h['throughput_rps'] / one['requests_per_s']:.2f} | {_f(_server(h, 'llm_batch_size'))} | "
                    f"{_f(_server(h, 'llm_queue_time_seconds'))} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="SmolLM2 tokenizer directory")
    p.add_argument("--encoder-tokenizer", type=Path, help="MiniLM tokenizer directory (omit: no /classify run)")
    p.add_argument("--models", default="S,L")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer levels, no HF batch runs")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument(
        "--gil-ab",
        action="store_true",
        help="also run the top levels with a 0.5 ms GIL switch interval (engine, HTTP, /classify)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-dry-run", action="store_true", help="check the plumbing on CPU with tiny sizes")
    args = p.parse_args()
    global DEV, PROMPT_LEN, NEW_TOKENS, CONCURRENCY, CLS_CONCURRENCY, HF_STATIC_BATCH, HF_CB_REQUESTS
    if args.cpu_dry_run:
        DEV, PROMPT_LEN, NEW_TOKENS = torch.device("cpu"), 16, 4
        CONCURRENCY, CLS_CONCURRENCY, HF_STATIC_BATCH, HF_CB_REQUESTS = (1, 2), (1, 2), 2, 4
    elif not torch.cuda.is_available():
        sys.exit("gpu_bench needs CUDA")
    import transformers

    results: dict[str, Any] = {
        "environment": {
            "gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (dry run)",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m load_tests.gpu_bench", *sys.argv[1:]]),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "host": platform.node(),
            "cpus": os.cpu_count(),
        },
        "models": {},
    }
    if not args.skip_http or args.encoder_tokenizer is not None:
        # The HTTP runs start `python -m server`: a missing web dependency (the GPU image lacks some) fails
        # here in a second instead of after the engine-level runs.
        importlib.import_module("server.app")
    args.out.mkdir(parents=True, exist_ok=True)
    flags = {
        "--quick": args.quick,
        "--skip-http": args.skip_http,
        "--gil-ab": args.gil_ab,
        "--cpu-dry-run": args.cpu_dry_run,
    }

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "results.md").write_text(markdown(results))

    names = args.models.split(",")
    for name in names:
        if len(names) == 1:
            try:
                results["models"][name] = bench_model(name, args)
            except Exception as exc:
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        else:
            # One process per model: HF's continuous batching sizes its cache from free GPU memory and
            # keeps it, so a later model in the same process would not fit.
            part = Path(tempfile.mkdtemp(prefix=f"gpu-bench-{name}-"))
            cmd = [sys.executable, "-m", "load_tests.gpu_bench", "--models", name, "--tokenizer", args.tokenizer]
            cmd += ["--out", str(part)] + [f for f, on in flags.items() if on]
            subprocess.run(cmd, check=False)
            try:
                child = json.loads((part / "results.json").read_text())
                results["models"].update(child["models"])
                results.setdefault("errors", {}).update(child.get("errors", {}))
            except (OSError, ValueError) as exc:
                results.setdefault("errors", {})[name] = f"child run left no results: {exc}"
        save()
    if args.encoder_tokenizer is not None:
        log("classification")
        levels = CLS_CONCURRENCY[:2] if args.quick else CLS_CONCURRENCY
        results["classification"] = classification(args.encoder_tokenizer, levels, args.gil_ab)
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
