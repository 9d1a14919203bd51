"""Automatic prefix caching: block accounting (unit) and identical outputs with the real model."""

from __future__ import annotations

import asyncio

import pytest

from engine import metrics
from engine.kv_cache import BlockManager
from engine.llm_engine import AsyncLLM, EngineConfig, LLMEngine
from engine.scheduler import Scheduler
from engine.sequence import SamplingParams, Sequence, SequenceStatus
from server.runtime import Runtime

BS = 4


def seq(tokens: list[int], max_tokens: int = 8) -> Sequence:
    return Sequence(prompt_ids=list(tokens), params=SamplingParams(max_tokens=max_tokens))


def admit(blocks: BlockManager, s: Sequence) -> list[int]:
    cached = blocks.match_prefix(s)
    assert blocks.can_allocate(s, cached)
    blocks.allocate(s, cached)
    return cached


def computed(blocks: BlockManager, s: Sequence) -> None:
    """What the engine does after a step: everything but the newest token is in the cache."""
    s.output_ids.append(1000 + len(s.output_ids))
    s.num_computed = s.num_tokens - 1
    blocks.commit(s)


@pytest.mark.unit
def test_shared_prefix_reuses_blocks_and_leaves_last_token() -> None:
    blocks = BlockManager(num_blocks=32, block_size=BS)
    a = seq(list(range(10)))  # 2 full blocks + 2 tokens
    assert admit(blocks, a) == []
    computed(blocks, a)
    assert blocks.num_cached == 2  # blocks [0..3], [4..7] published; the partial one is not

    b = seq([*range(10), 50, 51])  # same 10-token prefix, then different
    cached = admit(blocks, b)
    assert cached == a.block_table[:2]
    assert b.num_computed == 2 * BS
    assert b.block_table[2] != a.block_table[2]  # the partial block is private

    c = seq(list(range(8)))  # exactly 2 full blocks: the last token must stay uncomputed
    assert admit(blocks, c) == a.block_table[:1]
    assert c.num_computed == BS


@pytest.mark.unit
def test_refcounts_free_only_unused_blocks_and_keep_them_cached() -> None:
    blocks = BlockManager(num_blocks=16, block_size=BS)
    total = blocks.num_free
    a, b = seq(list(range(12))), seq([*range(12), 99])
    admit(blocks, a)
    computed(blocks, a)
    admit(blocks, b)
    shared = b.block_table[:3]
    blocks.free(a)
    assert blocks.num_free == total - len(b.block_table)  # shared blocks still held by b
    blocks.free(b)
    assert blocks.num_free == total and blocks.usage == 0
    assert blocks.num_cached == 3  # freed but still reusable
    d = seq([*range(12), 7])
    assert admit(blocks, d) == shared


@pytest.mark.unit
def test_eviction_drops_hashes_least_recently_freed_first() -> None:
    blocks = BlockManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    a = seq(list(range(9)))  # 3 blocks
    admit(blocks, a)
    computed(blocks, a)
    blocks.free(a)
    assert blocks.num_cached == 2
    big = seq([500 + i for i in range(13)])  # needs all 4 blocks: both cached blocks get evicted
    assert admit(blocks, big) == []
    assert blocks.num_cached == 0 and blocks.num_free == 0
    blocks.free(big)
    assert blocks.match_prefix(seq(list(range(9)))) == []

    small = BlockManager(num_blocks=5, block_size=BS)
    a = seq(list(range(9)))
    admit(small, a)
    computed(small, a)
    tail_first = a.block_table[:2]
    small.free(a)
    one = seq([700, 701, 702])  # 1 block: takes the plain free block first, nothing evicted
    admit(small, one)
    assert small.num_cached == 2
    two = seq([800 + i for i in range(8)])  # 2 blocks: the 1 plain block left, then evicts the tail block
    admit(small, two)
    assert tail_first[1] in two.block_table and tail_first[0] not in two.block_table
    assert small.match_prefix(seq(list(range(9)))) == tail_first[:1]


@pytest.mark.unit
def test_disabled_never_matches() -> None:
    blocks = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    a = seq(list(range(12)))
    admit(blocks, a)
    computed(blocks, a)
    assert blocks.num_cached == 0
    assert admit(blocks, seq(list(range(12)))) == []


def run_to_completion(sched: Scheduler) -> None:
    for _ in range(200):
        if not sched.has_work():
            return
        batch, _ = sched.schedule()
        for s in batch:
            computed(sched.blocks, s)
            if len(s.output_ids) >= s.params.max_tokens:
                sched.finish(s, "length")
    raise AssertionError("scheduler did not drain")


@pytest.mark.unit
def test_preemption_and_abort_with_shared_blocks_free_everything() -> None:
    blocks = BlockManager(num_blocks=9, block_size=BS)  # 8 usable blocks: too few for all at once
    sched = Scheduler(blocks, max_num_seqs=8, max_batched_tokens=64)
    system = list(range(8))
    aborted = seq([*system, 300], max_tokens=10)
    sched.add(aborted)
    sched.schedule()
    computed(blocks, aborted)  # publishes the 2 system-prompt blocks
    seqs = [seq([*system, 100 + i, 101 + i], max_tokens=10) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == ([aborted], False)  # a decode step comes between two prefill steps
    computed(blocks, aborted)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == seqs
    for s in batch:
        computed(blocks, s)
    assert seqs[0].block_table[:2] == aborted.block_table[:2]  # shared, ref count 2
    preemptions = metrics.PREEMPTIONS._value.get()
    sched.finish(aborted, "abort")  # leaves while others share its blocks
    assert all(blocks._ref[b] >= 1 for b in seqs[0].block_table)
    run_to_completion(sched)
    assert metrics.PREEMPTIONS._value.get() > preemptions  # 4 x 5 blocks never fit 8
    assert all(s.status is SequenceStatus.FINISHED and len(s.output_ids) == 10 for s in seqs)
    assert sched.hit_tokens > 0
    assert blocks.num_free == blocks.num_blocks - 1 and blocks.usage == 0
    assert all(r == 0 for r in blocks._ref)


async def _texts(llm: AsyncLLM, prompts: list[list[int]], max_tokens: int) -> list[str]:
    out = []
    for i, ids in enumerate(prompts):
        parts = [c.text async for c in llm.generate(ids, SamplingParams(max_tokens=max_tokens), f"pc-{i}")]
        out.append("".join(parts))
    return out


@pytest.mark.integration
async def test_outputs_identical_with_cache_on_and_off(runtime: Runtime) -> None:
    assert runtime.llm is not None
    engine = runtime.llm.engine
    tok = engine.tokenizer
    system = "You are a helpful support agent for an online shop. Answer briefly and politely. " * 4
    prompts = [
        tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in ("Where is my parcel?", "How do I get a refund?", "Where is my parcel?")
    ]
    texts = {}
    hits = {}
    for enabled in (False, True):
        config = EngineConfig(kv_cache_tokens=2048, block_size=16, max_model_len=1024, enable_prefix_caching=enabled)
        llm = AsyncLLM(LLMEngine(engine.runner.model, tok, engine.runner.device, engine.runner.k_cache.dtype, config))
        llm.start()
        try:
            texts[enabled] = await _texts(llm, prompts, max_tokens=8)
        finally:
            await asyncio.to_thread(llm.stop)
        hits[enabled] = llm.engine.scheduler.hit_tokens
    assert texts[True] == texts[False]
    assert hits[False] == 0
    system_blocks = len(tok(system).input_ids) // 16
    assert hits[True] >= 16 * system_blocks * 2  # requests 2 and 3 reuse at least the system prompt
