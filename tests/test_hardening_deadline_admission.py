"""Deadline-aware admission (issue 18 item 13), without models or processes: the real scheduler and engine
over a runner that computes nothing and advances a fake clock by a CPU-like cost per step, so overload
plays out in virtual seconds. Before, 25 prompts of 2,048 tokens with 512 new tokens each (what admission
lets in of the issue's 64) all ran into their 120 s deadline; now the engine starts only what can finish
and refuses the rest early (503 at the API)."""

from __future__ import annotations

import asyncio
import random
import types

import pytest
import torch

from engine.deadlines import MIN_DECODE_STEPS, StepRates, admissible, unreachable
from engine.llm_engine import SHED_MESSAGE, EngineConfig, LLMClient, LLMEngine, RequestShed
from engine.protocol import AddRequest, StepOutputs, TokenOutput
from engine.sequence import SamplingParams, Sequence
from models.llama import Llama
from tests.conftest import random_weights
from tests.virtual_clock import run_virtual

pytestmark = pytest.mark.unit

PREFILL_S_PER_TOKEN = 0.0005  # CPU-like step costs of the fake runner (seconds)
STEP_OVERHEAD_S = 0.015
DECODE_S_PER_CONTEXT_TOKEN = 8e-6  # a decode step reads every sequence's KV cache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama.from_hf(*random_weights(max_position_embeddings=4096))


def simulated_engine(model: Llama, clock: Clock) -> LLMEngine:
    """The server's CPU defaults (16 sequences, 512-token prefill steps, 32,768 KV tokens); each step costs
    virtual time and yields token 7 (never end-of-sequence) for every sequence whose prompt is complete."""
    config = EngineConfig(max_num_seqs=16, max_batched_tokens=512, kv_cache_tokens=32768, max_model_len=4096)
    engine = LLMEngine(model, types.SimpleNamespace(eos_token_id=0), torch.device("cpu"), torch.float32, config)
    engine.clock = clock

    def run(seqs: list[Sequence]) -> list[int | None]:
        if any(s.num_step_tokens > 1 for s in seqs):
            clock.now += STEP_OVERHEAD_S + PREFILL_S_PER_TOKEN * sum(s.num_step_tokens for s in seqs)
        else:
            clock.now += STEP_OVERHEAD_S + DECODE_S_PER_CONTEXT_TOKEN * sum(s.num_tokens for s in seqs)
        return [None if s.num_computed + s.num_step_tokens < s.num_tokens else 7 for s in seqs]

    engine.runner.run = run  # type: ignore[method-assign]
    return engine


def overload(
    engine: LLMEngine, clock: Clock, n: int, timeout: float, tell_engine: bool
) -> dict[int, tuple[str, float]]:
    """``n`` requests at once, each with a deadline ``timeout`` s away that the API server enforces (it
    aborts the engine request and answers 504); ``tell_engine``: the engine knows the deadlines.
    Returns each request's outcome ("length": finished, "shed", "504") and when."""
    rng = random.Random(0)
    deadlines = {}
    for key in range(n):
        prompt = [rng.randrange(1, 97) for _ in range(2048)]
        engine.add(AddRequest(key, prompt, SamplingParams(max_tokens=512), f"r{key}", timeout if tell_engine else None))
        deadlines[key] = clock.now + timeout
    outcome: dict[int, tuple[str, float]] = {}
    while engine.has_work():
        for out in engine.step():
            if out.finish_reason is not None:
                outcome[out.key] = (out.finish_reason, clock.now)
        for key, deadline in deadlines.items():
            if key not in outcome and clock.now >= deadline:
                engine.abort(key)
                outcome[key] = ("504", clock.now)
    return outcome


def test_overload_finishes_what_it_starts_and_sheds_the_rest_early(model: Llama) -> None:
    """The issue's case on a simulated CPU: without deadlines in the engine every request starts and every
    one ends in 504; with them, the requests the engine starts finish, the others are refused early."""
    clock = Clock()
    before = overload(simulated_engine(model, clock), clock, n=25, timeout=120.0, tell_engine=False)
    assert {reason for reason, _ in before.values()} == {"504"}  # nothing finished: what the issue saw

    clock = Clock()
    after = overload(simulated_engine(model, clock), clock, n=25, timeout=120.0, tell_engine=True)
    finished = [t for reason, t in after.values() if reason == "length"]
    shed = [t for reason, t in after.values() if reason == "shed"]
    assert len(finished) >= 4, after
    assert max(finished) < 120.0
    assert len(finished) + len(shed) == 25  # no 504: nothing ran into its deadline
    assert max(shed) < 60.0  # refused once it could no longer make it, not at the deadline


def test_a_short_request_is_not_shed_for_a_long_one_shed_ahead_of_it(model: Llama) -> None:
    """The queue sheds in order, and a shed prompt no longer counts for those behind it."""
    clock = Clock()
    engine = simulated_engine(model, clock)
    rng = random.Random(1)
    warm = [rng.randrange(1, 97) for _ in range(600)]
    engine.add(AddRequest(100, warm, SamplingParams(max_tokens=40), "warm", None))
    while engine.has_work():  # measures the speed: nothing is shed on a guess
        engine.step()
    assert engine.rates.prefill_s(1000) == pytest.approx(1000 * PREFILL_S_PER_TOKEN, rel=0.15)  # + step overheads
    # One runs (it started on an idle engine); behind it a long one that cannot make 5 s and a short one.
    engine.add(AddRequest(0, [rng.randrange(1, 97) for _ in range(1024)], SamplingParams(max_tokens=64), "a", 30.0))
    engine.step()
    engine.add(AddRequest(1, [rng.randrange(1, 97) for _ in range(2048)], SamplingParams(max_tokens=512), "b", 5.0))
    engine.add(AddRequest(2, [rng.randrange(1, 97) for _ in range(32)], SamplingParams(max_tokens=8), "c", 5.0))
    reasons = {}
    while engine.has_work():
        for out in engine.step():
            if out.finish_reason is not None:
                reasons[out.key] = out.finish_reason
    assert reasons == {0: "length", 1: "shed", 2: "length"}


def seq(prompt: int, max_tokens: int, deadline: float | None, computed: int = 0) -> Sequence:
    s = Sequence(prompt_ids=[1] * prompt, params=SamplingParams(max_tokens=max_tokens))
    s.deadline, s.num_computed = deadline, computed
    return s


def measured(prefill_s_per_token: float, decode_s: float) -> StepRates:
    rates = StepRates()
    rates.observe_prefill(1000, 1000 * prefill_s_per_token)
    for _ in range(MIN_DECODE_STEPS):
        rates.observe_decode(100, decode_s)
    return rates


def test_nothing_is_shed_or_held_before_the_speed_is_measured() -> None:
    hopeless = seq(2048, 512, deadline=0.001)
    running = [seq(100, 10, deadline=0.001, computed=99)]
    assert unreachable(running, [hopeless], StepRates(), 0.0, 512, lambda s: s.num_tokens) == []
    assert admissible(hopeless, running, StepRates(), 0.0, 512, 2048)


def test_shedding_estimate_counts_the_prefill_ahead_and_its_own_decode_steps() -> None:
    rates = measured(prefill_s_per_token=0.001, decode_s=0.1)  # 1 s per 1,000 prompt tokens, 0.1 s per step
    running = [seq(1000, 10, deadline=None)]  # 1,000 prompt tokens still to prefill: 2 steps of 512
    # Behind it: 1 s + 1 s of prefill + 4 decode steps between prefill steps + 9 decode steps = 3.3 s.
    fits, late = seq(1000, 10, deadline=3.31), seq(1000, 10, deadline=3.29)
    assert unreachable(running, [fits], rates, 0.0, 512, lambda s: s.num_tokens) == []
    assert unreachable(running, [late], rates, 0.0, 512, lambda s: s.num_tokens) == [late]
    # A sequence that already started (preempted) or has no deadline is never shed.
    started = seq(1000, 10, deadline=0.0)
    started.first_scheduled_time = 0.0
    assert unreachable(running, [started, seq(1000, 10, None)], rates, 0.0, 512, lambda s: s.num_tokens) == []
    # The head of the queue on an idle engine runs whatever its deadline (alone it may still stop early).
    assert unreachable([], [late], rates, 0.0, 512, lambda s: s.num_tokens) == []


def test_a_newcomer_waits_while_it_would_make_a_running_sequence_late() -> None:
    rates = StepRates()
    rates.observe_prefill(1000, 1.0)
    for context in (1000, 2000, 3000, 4000):  # a step costs 10 ms + 0.1 ms per token attended to
        rates.observe_decode(context, 0.01 + context * 1e-4)
    assert rates.decode_s(6000) == pytest.approx(0.61)
    running = [seq(2000, 100, deadline=30.0, computed=1999)]  # 100 steps of 0.21 s: 21 s
    newcomer = seq(2000, 100, deadline=None)
    # With it: 2 s of its prefill, 4 steps between, then 100 steps of 0.41 s: 43.6 s, past 30 s.
    assert not admissible(newcomer, running, rates, 0.0, 512, 2000)
    assert admissible(seq(100, 100, None), running, rates, 0.0, 512, 100)  # a short one fits
    # A running sequence that is late anyway does not hold others back.
    assert admissible(newcomer, [seq(2000, 100, deadline=10.0, computed=1999)], rates, 0.0, 512, 2000)


def admissible_one_by_one(
    seq: Sequence, running: list[Sequence], rates: StepRates, now: float, budget: int, own: int
) -> bool:
    """The rule ``admissible`` implements, one running sequence at a time."""
    if not rates.measured or not running:
        return True
    ahead = sum(max(s.num_tokens - s.num_computed, 0) if s.num_tokens - s.num_computed > 1 else 0 for s in running)
    context, batch = sum(s.num_tokens for s in running), len(running)
    decoding = any(s.num_tokens - s.num_computed <= 1 for s in running)

    def finish(prefill: int, decoding: bool, steps: int, batch: int, context: int) -> float:
        between = -(-prefill // budget) * float(rates.decode_s(context)) if decoding else 0.0
        step = float(rates.decode_s(context + batch * steps // 2))
        return now + rates.prefill_s(prefill) + between + steps * step

    for other in running:
        if other.deadline is None:
            continue
        steps = max(other.params.max_tokens - len(other.output_ids), 1)
        if finish(ahead, decoding, steps, batch, context) > other.deadline:
            continue
        if finish(ahead + own, True, steps, batch + 1, context + seq.num_tokens) > other.deadline:
            return False
    return True


def test_admission_estimates_all_running_sequences_together_as_one_by_one() -> None:
    rng = random.Random(7)
    rates = StepRates()
    rates.observe_prefill(4000, 2.0)
    for context in (1000, 3000, 6000, 9000):
        rates.observe_decode(context, 0.01 + context * 2e-5)
    answers = set()
    for _ in range(300):
        running = []
        for _ in range(rng.randint(1, 40)):
            prompt = rng.randint(1, 600)
            s = seq(prompt, rng.randint(1, 300), rng.choice([None, rng.uniform(0.5, 40.0)]), rng.randint(0, prompt))
            s.output_ids = [7] * rng.randint(0, s.params.max_tokens)
            running.append(s)
        newcomer, own = seq(rng.randint(1, 600), rng.randint(1, 300), None), rng.randint(1, 600)
        expected = admissible_one_by_one(newcomer, running, rates, 0.0, 512, own)
        assert admissible(newcomer, running, rates, 0.0, 512, own) == expected
        answers.add(expected)
    assert answers == {True, False}  # both outcomes were exercised


def test_the_client_sends_the_time_left_and_a_shed_request_raises() -> None:
    """The API side: the deadline (event-loop time) travels as seconds left, so an engine core in another
    process places it on its own clock; a shed answer ends the request with RequestShed."""
    sent: list[AddRequest] = []

    async def main() -> None:
        client = LLMClient(types.SimpleNamespace(), 4096, sent.append)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(7.0)  # virtual: the loop's clock is at 7 s
        chunks = client.generate([1, 2, 3], SamplingParams(max_tokens=4), "r", deadline=loop.time() + 30.0)
        pending = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0)
        assert sent[0].timeout_s == 30.0
        client.on_step(StepOutputs([TokenOutput(sent[0].key, None, "shed", 3, 0)], 0, 0))
        with pytest.raises(RequestShed, match="overloaded"):
            await pending
        assert str(RequestShed(SHED_MESSAGE)) == SHED_MESSAGE

    run_virtual(main())


def test_decode_growth_is_fitted_only_over_a_real_spread_of_contexts() -> None:
    """Noisy steps over nearly equal contexts give no growth to extrapolate (it would shed on noise)."""
    rates = StepRates()
    for context, seconds in ((24, 0.5), (28, 1.1), (32, 0.6), (36, 1.0)):
        rates.observe_decode(context, seconds)
    assert rates.decode_s(4000) == pytest.approx(rates.decode_s(30))
