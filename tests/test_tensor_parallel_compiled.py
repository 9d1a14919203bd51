"""Compiled tensor-parallel decode steps on CPU: two processes over gloo run their shards' decode steps as
``torch.compile`` code, the row-parallel all-reduce an opaque op inside it (models/tensor_parallel.py
``all_reduce_op``), and must give the eager split's logits and one process's."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from engine.cuda_graphs import DecodeConfig
from engine.kv_cache import BlockManager
from engine.model_runner import ModelRunner
from engine.tp import StepFanout, follow
from load_tests.tp_bench import forced_decode
from models.llama import Llama
from models.tensor_parallel import AllReduce, init_group, shard_llama
from tests.conftest import free_port, run_ranks

CPU = torch.device("cpu")
PROMPTS = [[5, 7, 11, 13, 17], [3] * 40, list(range(1, 19)), [42]]
STEPS = 6  # decode steps of the four rows together (the dynamic-batch graph), then of the first alone (batch 1's)


def runner(model: Llama, compile: bool, fanout: StepFanout | None = None, sample: bool = True) -> ModelRunner:
    config = DecodeConfig(max_num_seqs=4, max_model_len=256, compile=compile)
    return ModelRunner(model, BlockManager(64, 16), CPU, torch.float32, config, fanout, sample)


def rank_main(
    rank: int, port: int, addresses: tuple[str, str], config: LlamaConfig, state: dict[str, torch.Tensor], out: mp.Queue
) -> None:
    """Eager steps, then compiled ones, over the same shard; rank 0 drives both and reports their logits and
    how many sums went through the compiled step's op, rank 1 follows."""
    torch.set_num_threads(1)
    summed = [0]
    inner = AllReduce.summed

    def counted(self: AllReduce, x: torch.Tensor) -> torch.Tensor:
        summed[0] += 1
        return inner(self, x)

    AllReduce.summed = counted  # what the op runs; eager steps call the all-reduce directly
    init_group(rank, 2, f"127.0.0.1:{port}", CPU)
    model = shard_llama(Llama.from_hf(config, state), rank, 2)
    results = []
    for address, compile in zip(addresses, (False, True), strict=True):
        before = summed[0]
        if rank == 0:
            fanout = StepFanout([address])
            compiled = runner(model, compile, fanout)  # compiling runs steps: both ranks meet at their sums
            assert compiled.decode.compiled == compile
            results.append((forced_decode(compiled, PROMPTS, STEPS).numpy(), summed[0] - before))
            fanout.close()
        else:
            follow(address, runner(model, compile, sample=False).follow)
    if rank == 0:
        out.put(results)  # by value: a shared tensor would need this process alive to unpickle
    torch.distributed.destroy_process_group()


@pytest.mark.live  # two processes, and inductor compiles both ranks' steps (a minute on two cores)
def test_compiled_split_steps_match_eager_and_one_process(
    tiny: tuple[LlamaConfig, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    config, state = tiny
    alone = forced_decode(runner(Llama.from_hf(config, state), compile=False), PROMPTS, STEPS)
    port, addresses = free_port(), (f"ipc://{tmp_path}/eager", f"ipc://{tmp_path}/compiled")
    (eager, eager_sums), (compiled, compiled_sums) = run_ranks(rank_main, (port, addresses, config, state), timeout=600)
    assert eager_sums == 0  # eager steps sum in place, never through the op
    # Every compiled decode step sums twice per layer through the op (compiling ran steps too).
    assert compiled_sums >= 2 * STEPS * 2 * config.num_hidden_layers
    eager, compiled = torch.from_numpy(eager), torch.from_numpy(compiled)
    torch.testing.assert_close(eager, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, alone, rtol=1e-4, atol=1e-4)
    assert alone[:STEPS].abs().sum() > 0 and alone[STEPS:, 1:].abs().sum() == 0  # four rows, then one
