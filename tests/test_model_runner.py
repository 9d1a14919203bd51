"""The model runner's decode path (static buffers + buckets, CUDA graphs on a GPU) on a tiny random Llama:
it must match a plain recompute and Hugging Face's LlamaForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.cuda_graphs import DecodeConfig, batch_buckets, kv_buckets
from engine.kv_cache import BlockManager
from engine.model_runner import ModelRunner, zeros
from engine.scheduler import Scheduler
from engine.sequence import SamplingParams, Sequence
from models.llama import Llama

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def make_runner(config: LlamaConfig, state: dict[str, torch.Tensor], max_num_seqs: int = 8) -> ModelRunner:
    model = Llama.from_hf(config, state)
    return ModelRunner(model, BlockManager(64, 16), CPU, torch.float32, DecodeConfig(max_num_seqs, 200))


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert batch_buckets(100)[-3:] == [80, 96, 100]
    assert kv_buckets(384, 16) == [64, 128, 256, 384]
    assert kv_buckets(100, 48) == [96, 144]


def test_cpu_kv_cache_is_zeroed_writable_memory() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        t = zeros((3, 1000, 2, 8), CPU, dtype)
        assert t.shape == (3, 1000, 2, 8) and t.dtype == dtype and t.is_contiguous()
        assert torch.equal(t, torch.zeros_like(t))
        t[1, 500:] = 2.0
        assert t.sum().item() == 2.0 * 500 * 2 * 8 and t[0].abs().sum().item() == 0.0


def greedy_run(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill all prompts together, then decode ``steps`` tokens, as the engine does."""
    seqs = [Sequence(prompt_ids=p, params=SamplingParams(max_tokens=steps)) for p in prompts]
    for s in seqs:
        runner.blocks.allocate(s)
    for _ in range(steps):
        tokens = runner.run(seqs)
        for s, t in zip(seqs, tokens, strict=True):
            s.output_ids.append(t)
            s.num_computed = s.num_tokens - 1
            runner.blocks.allocate(s)
    for s in seqs:
        runner.blocks.free(s)
    return [s.output_ids for s in seqs]


def test_greedy_matches_hf_and_is_batch_independent(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    config, state = tiny
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(state)
    prompts = [[5, 7, 11, 13, 17], [3] * 40, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [42]]
    runner = make_runner(config, state)
    together = greedy_run(runner, prompts, steps=30)
    for prompt, out in zip(prompts, together, strict=True):
        alone = greedy_run(runner, [prompt], steps=30)[0]
        assert out == alone
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0)
        assert out == ref[0, len(prompt) :].tolist()


def test_decode_logits_match_recompute(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    """The decode step's logits equal those of the eager path recomputing the whole sequence."""
    config, state = tiny
    runner = make_runner(config, state)
    seqs = [Sequence(prompt_ids=list(range(1, n + 1)), params=SamplingParams()) for n in (3, 20, 70)]
    for s in seqs:
        runner.blocks.allocate(s)
    runner.run(seqs)  # prefill all but nothing else: now decode the next token from the cache
    for s in seqs:
        s.output_ids.append(9)
        s.num_computed = s.num_tokens - 1
        runner.blocks.allocate(s)
    _, decoded = runner.decode.run(seqs)
    for s in seqs:
        s.num_computed = 0
    ids, positions, meta, last = runner._prepare(seqs)
    hidden = runner.model(ids, positions, meta, (runner.k_cache, runner.v_cache))
    recomputed = runner.model.logits(hidden[torch.arange(len(seqs)), last])
    torch.testing.assert_close(decoded, recomputed, rtol=1e-4, atol=1e-4)


def test_fused_projections_match_separate(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    """Fusing q/k/v and gate/up (the runner does it) changes no result; a replaced Linear stays unfused."""
    config, state = tiny
    runner = make_runner(config, state)  # all fused

    class Replaced(torch.nn.Linear):  # stands in for a module swapped in by a compression pass
        pass

    def replace(module: torch.nn.Module, name: str) -> None:
        old = getattr(module, name)
        new = Replaced(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        setattr(module, name, new)

    partly = Llama.from_hf(config, state)
    replace(partly.layers[0].mlp, "up_proj")
    replace(partly.layers[1].self_attn, "q_proj")
    partly.fuse_projections()
    assert partly.layers[0].mlp.gate_up_proj is None and partly.layers[0].self_attn.qkv_proj is not None
    assert partly.layers[1].self_attn.qkv_proj is None and partly.layers[1].mlp.gate_up_proj is not None
    seqs = [Sequence(prompt_ids=list(range(1, n + 1)), params=SamplingParams()) for n in (5, 33)]
    for s in seqs:
        runner.blocks.allocate(s)
    ids, positions, meta, _ = runner._prepare(seqs)
    kv = (runner.k_cache, runner.v_cache)
    with torch.inference_mode():
        torch.testing.assert_close(runner.model(ids, positions, meta, kv), partly(ids, positions, meta, kv))


def scheduled_run(
    config: LlamaConfig, state: dict[str, torch.Tensor], prompts: list[list[int]], params: SamplingParams, budget: int
) -> tuple[list[list[int]], list[bool]]:
    """Scheduler + runner stepped as LLMEngine.step does; returns the outputs and each step's kind."""
    runner = make_runner(config, state)
    sched = Scheduler(runner.blocks, max_num_seqs=8, max_batched_tokens=budget)
    seqs = [Sequence(prompt_ids=p, params=params) for p in prompts]
    for s in seqs:
        sched.add(s)
    kinds = []
    while sched.has_work():
        batch, is_prefill = sched.schedule()
        kinds.append(is_prefill)
        for s, token in zip(batch, runner.run(batch), strict=True):
            s.num_computed += s.num_step_tokens
            s.num_scheduled = 0
            runner.blocks.commit(s)  # prefix caching on: chunks publish their full blocks as they go
            if token is not None:
                s.output_ids.append(token)
                if len(s.output_ids) == params.max_tokens:
                    sched.finish(s, "length")
    return [s.output_ids for s in seqs], kinds


@pytest.mark.parametrize(
    "params", [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=0.9, seed=5)]
)
def test_chunked_prefill_gives_the_same_tokens(
    tiny: tuple[LlamaConfig, dict[str, torch.Tensor]], params: SamplingParams
) -> None:
    """Prompts longer than the prefill budget run in chunks (decode steps in between) and produce the
    same tokens as one-step prefill, greedy and seeded sampling alike."""
    config, state = tiny
    # Chunked, the 4th prompt can reuse the blocks the 2nd published.
    prompts = [[3] * 5, list(range(1, 71)), [7, 9] * 20, list(range(1, 71))]
    whole, whole_kinds = scheduled_run(config, state, prompts, params, budget=4096)
    chunked, kinds = scheduled_run(config, state, prompts, params, budget=16)
    assert chunked == whole
    assert whole_kinds[0] and not any(whole_kinds[1:])  # everything fits one prefill step
    prefills = [i for i, k in enumerate(kinds) if k]
    assert len(prefills) >= 115 // 16  # 115+ prompt tokens in chunks of at most 16
    assert all(not kinds[i + 1] for i in prefills[1:-1])  # the first prompt decodes between chunks


def test_a_budget_below_the_block_size_still_makes_progress(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    config, state = tiny
    params = SamplingParams(max_tokens=4)
    assert (
        scheduled_run(config, state, [list(range(1, 41))], params, budget=8)[0]
        == scheduled_run(config, state, [list(range(1, 41))], params, budget=4096)[0]
    )
