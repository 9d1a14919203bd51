"""CPU decode policy and the compiled CPU decode step (engine/cuda_graphs.py with ``compile``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from engine.cuda_graphs import DecodeConfig
from engine.kv_cache import BlockManager
from engine.model_runner import ModelRunner
from engine.sequence import SamplingParams, Sequence
from models.cpu_policy import cpu_features, cpu_policy
from models.llama import Llama
from tests.test_model_runner import CPU, greedy_run, make_runner


@pytest.mark.unit
def test_cpu_features_read_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_features(info) == {"fpu", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_features(tmp_path / "absent") == frozenset()


@pytest.mark.unit
def test_cpu_policy_compiles_only_with_a_compiler() -> None:
    vnni = frozenset({"avx2", "avx512_vnni"})
    assert cpu_policy(vnni, "/usr/bin/g++").compile_decode
    assert not cpu_policy(vnni, "").compile_decode
    assert cpu_policy(vnni, "/usr/bin/g++").quantize == "int8"
    assert cpu_policy(frozenset({"avx2"}), "/usr/bin/g++").quantize == "none"  # int8 w8a8 measured slower there


@pytest.mark.integration  # compiles C++ (inductor) for the tiny model: tens of seconds
def test_compiled_cpu_decode_matches_eager(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    """Decode steps compiled per batch bucket (KV length a dynamic dimension) give the eager step's
    logits and tokens, across KV buckets, and write the same KV cache."""
    config, state = tiny
    eager = make_runner(config, state, max_num_seqs=1)
    compiled = ModelRunner(
        Llama.from_hf(config, state), BlockManager(64, 16), CPU, torch.float32, DecodeConfig(1, 200, compile=True)
    )
    assert compiled.decode.compiled and not eager.decode.compiled
    prompt = list(range(1, 41))  # 40 + 40 steps: crosses the 64-token KV bucket
    assert greedy_run(compiled, [prompt], steps=40) == greedy_run(eager, [prompt], steps=40)
    scratch = compiled.blocks.block_size  # block 0, written by the compile's warm-up steps
    torch.testing.assert_close(compiled.k_cache[:, scratch:], eager.k_cache[:, scratch:], rtol=1e-4, atol=1e-5)
    seqs = []
    for runner in (eager, compiled):
        s = Sequence(prompt_ids=list(range(3, 73)), params=SamplingParams())
        runner.blocks.allocate(s)
        runner.run([s])
        s.output_ids.append(9)
        s.num_computed = s.num_tokens - 1
        runner.blocks.allocate(s)
        seqs.append(runner.decode.run([s])[1])
    torch.testing.assert_close(seqs[1], seqs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_a_second_compiled_runner_uses_its_own_model(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    """Graphs compiled for one runner are not reused by another whose model differs (fewer guards)."""
    config, state = tiny
    other = dict(state)  # layer 0's MLP pruned to 96 channels: other shapes, same code path
    for name in ("gate_proj", "up_proj"):
        other[f"model.layers.0.mlp.{name}.weight"] = state[f"model.layers.0.mlp.{name}.weight"][:96].flip(1)
    other["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"][:, :96]
    prompt = list(range(5, 25))
    for weights in (state, other):
        runner = ModelRunner(
            Llama.from_hf(config, weights), BlockManager(64, 16), CPU, torch.float32, DecodeConfig(1, 200, compile=True)
        )
        assert greedy_run(runner, [prompt], steps=8) == greedy_run(make_runner(config, weights, 1), [prompt], steps=8)


@pytest.mark.integration
def test_two_graphs_serve_every_batch_bucket(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    """One graph for batch 1 and one for every larger bucket (rows and KV length dynamic); batched
    decode through the second gives the eager runner's tokens."""
    from torch._dynamo.utils import counters

    config, state = tiny
    before = counters["stats"]["unique_graphs"]
    compiled = ModelRunner(
        Llama.from_hf(config, state), BlockManager(64, 16), CPU, torch.float32, DecodeConfig(8, 200, compile=True)
    )
    assert compiled.decode.batch_sizes == [1, 2, 4, 8]
    assert counters["stats"]["unique_graphs"] - before == 2
    prompts = [[5, 7, 11], list(range(1, 50)), [42] * 20]  # 3 rows: bucket 4; crosses the 64-token KV bucket
    assert greedy_run(compiled, prompts, steps=20) == greedy_run(make_runner(config, state), prompts, steps=20)
    assert counters["stats"]["unique_graphs"] - before == 2
