"""Reproduce the compression table: every setting's fidelity, weight bytes and speed.

Generation rows: perplexity on data/eval.txt, greedy top-1 agreement with the uncompressed model
(teacher-forced, every position), weight bytes before/after, decode tokens/s (one stream, and eight
concurrent streams), prefill time of a 512-token prompt, all through the real engine (AsyncLLM).
Classification rows: embedding cosine and zero-shot label agreement with the uncompressed encoder,
accuracy on data/intents.jsonl, weight bytes, classify throughput (texts/s, batches of 32).

On random weights (``dummy:*``) only speed, bytes and agreement with the uncompressed model mean
anything; perplexity and accuracy are reported but meaningless.

    python -m load_tests.compression_table --device cpu --out load_tests/results/compression/cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.classifier import Classifier
from engine.cuda_graphs import DecodeGraphs, bucket
from engine.llm_engine import AsyncLLM, EngineConfig, LLMEngine
from engine.sequence import SamplingParams
from models import calibration as calib
from models.compress import CompressionSpec, compress_causal_lm, compress_encoder, default_spec, weight_bytes
from models.fidelity import evaluate_encoder, evaluate_lm
from models.llama import Llama
from models.loader import LoadedCausalLM, LoadedEncoder, load_causal_lm, load_encoder

GEN_SETTINGS = [
    {"quantize": "none"},
    {"quantize": "none", "prune_mlp": 0.01},
    {"quantize": "none", "prune_mlp": 0.04, "prune_allocation": "uniform"},
    {"quantize": "int8-wo"},
    {"quantize": "int8", "smooth_alpha": None},
    {"quantize": "int8"},
    {"quantize": "int8", "keep_float": ["lm_head"]},
    {"quantize": "int8", "prune_mlp": 0.01},
    {"quantize": "int8", "prune_mlp": 0.02},
]
"""CPU rows; settings not named take the defaults of models.compress.default_spec (int8: smooth_alpha 0.5,
global allocation, least-squares refit)."""
GPU_GEN_SETTINGS = [
    {"quantize": "none"},
    {"quantize": "int8-wo"},
    {"quantize": "int8-wo", "prune_mlp": 0.01},
    {"quantize": "int8-wo", "prune_mlp": 0.05},
    {"quantize": "fp8"},
]
CLS_SETTINGS = [
    {"quantize": "none"},
    {"quantize": "int8"},
    {"quantize": "int8", "prune_mlp": 0.05},
    {"quantize": "int8", "prune_mlp": 0.1},
    {"quantize": "int8", "prune_mlp": 0.25},
]
GPU_CLS_SETTINGS = [{"quantize": "none"}, {"quantize": "int8-wo"}, {"quantize": "fp8"}]


def spec_of(setting: dict, eval_tokens: int, calib_tokens: int, task: str = "generate") -> CompressionSpec:
    base = default_spec(setting["quantize"], setting.get("prune_mlp", 0.0), task)  # type: ignore[arg-type]
    return base.model_copy(update={**setting, "eval_tokens": eval_tokens, "calib_tokens": calib_tokens})


def free_memory(device: torch.device) -> None:
    """Drop the last setting's engine (KV cache, CUDA graphs) before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fresh_llama(loaded: LoadedCausalLM, device: torch.device, dtype: torch.dtype) -> Llama:
    memo: dict[int, torch.Tensor] = {}  # clone, keeping tied tensors tied
    sd = {k: memo.setdefault(id(v), v.to(dtype).clone()) for k, v in loaded.state_dict.items()}
    return Llama.from_hf(loaded.config, sd).to(device)


async def _timed_generate(llm: AsyncLLM, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, time of the rest, tokens) for one greedy request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async for chunk in llm.generate(prompt, SamplingParams(max_tokens=max_tokens), f"bench-{start}"):
        if first is None:
            first = time.perf_counter()
        tokens = chunk.completion_tokens
    end = time.perf_counter()
    assert first is not None
    return first - start, end - first, tokens


async def engine_speed(model: Llama, loaded: LoadedCausalLM, device: torch.device, dtype: torch.dtype, args) -> dict:
    streams = [8, *args.wide_streams]
    config = EngineConfig(
        max_num_seqs=max(streams), max_batched_tokens=4096, kv_cache_tokens=max(16384, 128 * max(streams)),
        max_model_len=4096,
    )  # fmt: skip
    llm = AsyncLLM(LLMEngine(model, loaded.tokenizer, device, dtype, config))
    llm.start()
    try:
        ids = loaded.tokenizer(calib.read_text(calib.EVAL_TEXT), add_special_tokens=False)["input_ids"]
        await _timed_generate(llm, ids[:32], 4)  # warm up
        prefill = [(await _timed_generate(llm, ids[i * 64 : i * 64 + 512], 1))[0] for i in range(args.repeats)]
        decode = []
        for i in range(args.repeats):
            _, rest, n = await _timed_generate(llm, ids[i * 16 : i * 16 + 16], args.decode_tokens)
            decode.append((n - 1) / rest)
        many = {}
        for n_streams in streams:
            start = time.perf_counter()
            results = await asyncio.gather(
                *(_timed_generate(llm, ids[i * 8 : i * 8 + 16], args.decode_tokens) for i in range(n_streams))
            )
            many[f"decode_{n_streams}_streams_tok_s"] = round(
                sum(n for _, _, n in results) / (time.perf_counter() - start), 2
            )
    finally:
        llm.stop()
    return {
        "prefill_512_ms": round(1000 * statistics.median(prefill), 2),
        "decode_tok_s": round(statistics.median(decode), 2),
        **many,
        **(graph_step_ms(llm.engine.runner.decode, streams) if device.type == "cuda" else {}),
    }


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    """GPU time of one replay (CUDA events around ``reps`` replays)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / reps, 4)


def graph_step_ms(decode: DecodeGraphs, batches: list[int]) -> dict:
    """GPU time of one captured decode step per batch size (CUDA events around 50 replays; all rows
    on the scratch block, so attention is near-free): the model's own cost, without the host noise
    that the tokens/s columns carry on a slow host CPU."""
    decode.inputs.zero_()
    out = {}
    for batch in [1, *batches]:
        key = (bucket(decode.batch_sizes, batch), decode.kv_lens[0])
        if key not in decode.graphs:
            continue
        out[f"graph_step_ms_b{batch}"] = replay_ms(decode.graphs[key])
    return out


def gen_rows(args, device: torch.device, dtype: torch.dtype, settings: list[dict]) -> list[dict]:
    loaded = load_causal_lm(args.gen_model, args.cache_dir, dtype, args.tokenizer)
    windows = calib.token_windows(loaded.tokenizer, calib.read_text(calib.EVAL_TEXT), args.eval_tokens, 256)
    rows = []
    for setting in settings:
        spec = spec_of(setting, args.eval_tokens, args.calib_tokens)
        model = fresh_llama(loaded, device, dtype)
        before = weight_bytes(model)
        if spec.is_identity:
            start = time.perf_counter()
            ref = evaluate_lm(model, windows)
            fid = {"perplexity_after": ref.perplexity, "top1_agreement": 1.0, "eval_tokens": float(ref.tokens)}
            seconds = time.perf_counter() - start
            after = before
        else:
            model, report = compress_causal_lm(model, loaded.config, loaded.tokenizer, spec, loaded.source, None)
            fid, seconds, after = report.fidelity, report.seconds, report.weight_bytes_after
        row = {
            "setting": setting,
            "spec": spec.model_dump(mode="json"),
            "perplexity": round(fid["perplexity_after"], 4),
            "perplexity_change": round(fid.get("perplexity_change", 0.0), 4),
            "top1_agreement": round(fid["top1_agreement"], 4),
            "eval_tokens": int(fid["eval_tokens"]),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "weight_bytes_cut": round(1 - after / before, 4),
            "compress_seconds": round(seconds, 1),
            **asyncio.run(engine_speed(model, loaded, device, dtype, args)),
        }
        logging.info("generate %s", row)
        rows.append(row)
        del model
        free_memory(device)
    return rows


def cls_rows(args, device: torch.device, dtype: torch.dtype, settings: list[dict]) -> list[dict]:
    original = load_encoder(args.cls_model, args.cache_dir, dtype, args.cls_tokenizer)
    original.model.to(device)
    texts, gold, descriptions = calib.read_intents()
    rows = []
    for setting in settings:
        spec = spec_of(setting, args.eval_tokens, args.calib_tokens, "classify")
        encoder = LoadedEncoder(copy.deepcopy(original.model), original.tokenizer, original.id2label, original.source)
        before = weight_bytes(encoder.model)
        if spec.is_identity:
            ref = evaluate_encoder(Classifier(encoder, device).embed, texts, gold, descriptions)
            fid = {"embedding_cosine": 1.0, "label_agreement": 1.0, "accuracy_after": ref.accuracy}
            after = before
        else:
            report = compress_encoder(encoder, spec, None, lambda enc: Classifier(enc, device).embed)
            fid, after = report.fidelity, report.weight_bytes_after
        clf = Classifier(encoder, device)
        clf.embed(texts[:32])
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for i in range(0, len(texts), 32):
                clf.embed(texts[i : i + 32])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if clf.graphs.graphs:  # CUDA: the captured batches against the same forward run eagerly
            with torch.inference_mode():
                graphed = clf.embed(texts[:32])
                clf.graphs.enabled = False
                eager = clf.embed(texts[:32])
                clf.graphs.enabled = True
            extra = {
                "graphs": len(clf.graphs.graphs),
                "graph_vs_eager_max_abs": float((graphed - eager).abs().max()),
                **{f"graph_batch_ms_{b}x{s}": replay_ms(g) for (b, s), g in sorted(clf.graphs.graphs.items())},
            }
        else:
            extra = {}
        row = {
            "setting": setting,
            "spec": spec.model_dump(mode="json"),
            "embedding_cosine": round(fid["embedding_cosine"], 5),
            "label_agreement": round(fid["label_agreement"], 4),
            "accuracy": round(fid["accuracy_after"], 4),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "weight_bytes_cut": round(1 - after / before, 4),
            "classify_texts_s": round(len(texts) / statistics.median(times), 1),
            **extra,
        }
        logging.info("classify %s", row)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [f"### {result['device']} — {result['date']}", "", f"`{result['command']}`", ""]
    if result["generate"]:
        first = result["generate"][0]
        wide = [int(k.split("_")[1]) for k in first if k.startswith("decode_") and k.endswith("_streams_tok_s")]
        steps = [k for k in first if k.startswith("graph_step_ms_b")]
        lines += [
            f"Generation model `{result['gen_model']}`, {result['dtype']}:",
            "",
            "| setting | ppl | Δppl | top-1 agree | weights MiB (cut) | decode tok/s | "
            + "".join(f"{n}-stream tok/s | " for n in wide)
            + "prefill 512 ms |"
            + "".join(f" step ms @{k.removeprefix('graph_step_ms_b')} |" for k in steps),
            "|---|---|---|---|---|---|" + "---|" * len(wide) + "---|" + "---|" * len(steps),
        ]
        for r in result["generate"]:
            lines.append(
                f"| {_name(r['setting'])} | {r['perplexity']:.2f} | {100 * r['perplexity_change']:+.1f}% | "
                f"{100 * r['top1_agreement']:.1f}% | {r['weight_bytes_after'] / 2**20:.0f} "
                f"(-{100 * r['weight_bytes_cut']:.0f}%) | {r['decode_tok_s']:.1f} | "
                + "".join(f"{r[f'decode_{n}_streams_tok_s']:.1f} | " for n in wide)
                + f"{r['prefill_512_ms']:.0f} |"
                + "".join(f" {r[k]:.3f} |" for k in steps)
            )
        lines.append("")
    if result["classify"]:
        batch_keys = [k for k in result["classify"][0] if k.startswith("graph_batch_ms_")]
        lines += [
            f"Classification model `{result['cls_model']}`:",
            "",
            "| setting | emb. cosine | label agree | accuracy | weights MiB (cut) | texts/s |"
            + "".join(f" GPU ms/batch {k.removeprefix('graph_batch_ms_')} |" for k in batch_keys),
            "|---|---|---|---|---|---|" + "---|" * len(batch_keys),
        ]
        for r in result["classify"]:
            lines.append(
                f"| {_name(r['setting'])} | {r['embedding_cosine']:.4f} | {100 * r['label_agreement']:.1f}% | "
                f"{100 * r['accuracy']:.1f}% | {r['weight_bytes_after'] / 2**20:.1f} "
                f"(-{100 * r['weight_bytes_cut']:.0f}%) | {r['classify_texts_s']:.0f} |"
                + "".join(f" {r[k]:.3f} |" for k in batch_keys)
            )
        lines.append("")
    return "\n".join(lines)


def _name(setting: dict) -> str:
    extras = [f"{k}={v}" for k, v in setting.items() if k not in ("quantize", "prune_mlp")]
    prune = setting.get("prune_mlp", 0.0)
    return setting["quantize"] + (f" + prune {100 * prune:g}%" if prune else "") + "".join(f", {e}" for e in extras)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gen-model", default="default")
    parser.add_argument("--cls-model", default="default")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir for dummy generation models")
    parser.add_argument("--cls-tokenizer", default=None, help="tokenizer dir for dummy encoders")
    parser.add_argument("--dtype", default=None, help="serving dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lowlat-server")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity/agreement")
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--wide-streams", type=int, nargs="*", default=[], help="more concurrent-stream counts to time besides 8"
    )
    parser.add_argument("--only", choices=["generate", "classify"], default=None)
    parser.add_argument("--settings", type=json.loads, default=None, help="JSON list of generation settings")
    parser.add_argument("--cls-settings", type=json.loads, default=None, help="JSON list of classifier settings")
    parser.add_argument("--out", type=Path, required=True, help="JSON output; a .md table is written next to it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    result = {
        "command": "python -m load_tests.compression_table " + shlex.join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if gpu
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "gen_model": args.gen_model,
        "cls_model": args.cls_model,
        "dtype": str(dtype),
        "random_weights_note": "dummy:* models have random weights: only speed, bytes and agreement are meaningful",
        "generate": [],
        "classify": [],
    }
    if args.only in (None, "generate"):
        result["generate"] = gen_rows(args, device, dtype, args.settings or (GPU_GEN_SETTINGS if gpu else GEN_SETTINGS))
    if args.only in (None, "classify"):
        result["classify"] = cls_rows(
            args, device, dtype, args.cls_settings or (GPU_CLS_SETTINGS if gpu else CLS_SETTINGS)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
