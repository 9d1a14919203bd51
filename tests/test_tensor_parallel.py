"""Tensor parallelism on CPU: two processes over gloo run the sharded model (models/tensor_parallel.py), rank 0
scheduling and sampling, rank 1 following its steps (engine/tp.py), and must give what one process gives."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from transformers import LlamaConfig

from engine.llm_engine import EngineConfig
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import SamplingParams, Sequence
from engine.tp import StepFanout, follow
from models.llama import Llama, ModelArgs
from models.quantize import QuantLinear
from models.sources import dummy_config, resolve_spec
from models.tensor_parallel import RowParallel, init_group, local_heads, shard_llama
from tests.conftest import free_port, run_ranks, server_process

CPU = torch.device("cpu")
PROMPTS = [[5, 7, 11, 13, 17], [3] * 40, list(range(1, 19)), [42]]
CONFIG = EngineConfig(max_num_seqs=4, max_batched_tokens=32, kv_cache_tokens=1024, block_size=16, max_model_len=256)


def generate(model: Llama, fanout: StepFanout | None = None, steps: int = 24) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuations of PROMPTS through scheduler + runner (chunked prefill: the budget is 32 tokens),
    and the logits of a whole-prompt forward of the first prompt."""
    runner = ModelRunner(model, CONFIG.kv_blocks(), CPU, torch.float32, CONFIG.decode(model), fanout)
    sched = Scheduler(runner.blocks, CONFIG.max_num_seqs, CONFIG.max_batched_tokens)
    seqs = [Sequence(prompt_ids=p, params=SamplingParams(max_tokens=steps)) for p in PROMPTS]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        batch, _ = sched.schedule()
        for s, token in zip(batch, runner.run(batch), strict=True):
            s.num_computed += s.num_step_tokens
            s.num_scheduled = 0
            runner.blocks.commit(s)
            if token is not None:
                s.output_ids.append(token)
                if len(s.output_ids) >= steps:
                    sched.finish(s, "length")
    probe = Sequence(prompt_ids=PROMPTS[2], params=SamplingParams())
    runner.blocks.allocate(probe)
    step = runner._host_inputs([probe])
    runner._send(step)
    ids, positions, meta, _ = runner._device_inputs(step)
    with torch.inference_mode():
        logits = model.logits(model(ids, positions, meta, (runner.k_cache, runner.v_cache))[0])
    return [s.output_ids for s in seqs], logits


def rank_main(
    rank: int, port: int, address: str, config: LlamaConfig, state: dict[str, torch.Tensor], out: mp.Queue
) -> None:
    init_group(rank, 2, f"127.0.0.1:{port}", CPU)
    model = shard_llama(Llama.from_hf(config, state), rank, 2)
    if rank == 0:
        fanout = StepFanout([address])
        tokens, logits = generate(model, fanout)
        out.put((tokens, logits.numpy()))  # by value: a shared tensor would need this process alive to unpickle
        fanout.close()
    else:
        runner = ModelRunner(model, CONFIG.kv_blocks(), CPU, torch.float32, CONFIG.decode(model), sample=False)
        follow(address, runner.follow)
    torch.distributed.destroy_process_group()


@pytest.mark.live  # two processes
def test_two_ranks_match_one(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    config, state = tiny
    alone_tokens, alone_logits = generate(Llama.from_hf(config, state))
    port, address = free_port(), f"ipc://{tmp_path}/rank-1"
    tokens, logits = run_ranks(rank_main, (port, address, config, state), timeout=300)
    logits = torch.from_numpy(logits)
    assert tokens == alone_tokens
    torch.testing.assert_close(logits, alone_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_shard_keeps_heads_and_channels(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    """Each rank keeps its heads' rows of q/k/v, the matching columns of o_proj, its MLP channels, and
    8-bit projections split with their per-row scales; the shard's args describe its heads."""
    config, state = tiny
    whole = Llama.from_hf(config, state)
    shards = [Llama.from_hf(config, state) for _ in (0, 1)]
    for shard in shards:
        mlp = shard.layers[0].mlp
        mlp.up_proj = QuantLinear.from_linear(mlp.up_proj, "int8-wo")
    for rank, shard in enumerate(shards):
        shard_llama(shard, rank, 2)
        attn, ref = shard.layers[1].self_attn, whole.layers[1].self_attn
        assert (shard.args.num_heads, shard.args.num_kv_heads) == (2, 1)
        d = config.hidden_size // config.num_attention_heads
        torch.testing.assert_close(attn.q_proj.weight, ref.q_proj.weight[rank * 2 * d : (rank + 1) * 2 * d])
        torch.testing.assert_close(attn.k_proj.weight, ref.k_proj.weight[rank * d : (rank + 1) * d])
        assert isinstance(attn.o_proj, RowParallel)
        torch.testing.assert_close(attn.o_proj.inner.weight, ref.o_proj.weight[:, rank * 2 * d : (rank + 1) * 2 * d])
        up = shard.layers[0].mlp.up_proj
        assert isinstance(up, QuantLinear) and up.out_features == config.intermediate_size // 2
    quant = QuantLinear.from_linear(whole.layers[0].mlp.up_proj, "int8-wo")
    halves = torch.cat([s.layers[0].mlp.up_proj.dequantized(torch.float32) for s in shards])
    torch.testing.assert_close(halves, quant.dequantized(torch.float32))
    with pytest.raises(ValueError, match="does not divide"):
        shard_llama(Llama.from_hf(config, state), 0, 3)


@pytest.mark.unit
def test_8b_class_preset_splits_over_two_and_eight() -> None:
    args = ModelArgs.from_hf(dummy_config(resolve_spec("dummy:llama-8b", "generate")))
    assert (args.hidden_size, args.intermediate_size, args.num_layers, args.head_dim) == (4096, 14336, 32, 128)
    assert local_heads(args, 2) == (16, 4) and local_heads(args, 8) == (4, 1)


@pytest.mark.live  # server processes
def test_server_with_two_ranks_answers_as_one(cache_dir: Path) -> None:
    """``--tensor-parallel-size 3`` on CPU (gloo; SmolLM2-135M's 9 heads and 3 KV heads split by 3, not 2):
    an engine core whose two worker processes hold a third of every layer each answers greedy requests with
    the tokens of an unsplit server (float weights: the split changes only the order of additions)."""
    float_model = {"gen_quantize": "none", "gen_prune": 0, "enable_classify": False}
    body = {"prompt": "The three primary colours are", "max_tokens": 24, "temperature": 0}
    answers = []
    for args in ((), ("--engine-core", "process", "--tensor-parallel-size", "3")):
        with server_process(cache_dir, *args, **float_model) as (proc, url):
            if args:
                children = subprocess.run(
                    ["ps", "-o", "comm=", "--ppid", ",".join(str(p) for p in _descendants(proc.pid))],
                    capture_output=True,
                    text=True,
                ).stdout.split()
                assert {"tp-worker-1", "tp-worker-2"} <= set(children)
            answer = httpx.post(f"{url}/generate", json=body, timeout=120)
            assert answer.status_code == 200
            answers.append(answer.json())
    assert answers[1]["text"] == answers[0]["text"]
    assert answers[1]["usage"] == answers[0]["usage"]


def _descendants(pid: int) -> list[int]:
    found, frontier = [pid], [pid]
    while frontier:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(frontier.pop())], capture_output=True, text=True)
        kids = [int(p) for p in out.stdout.split()]
        found += kids
        frontier += kids
    return found
