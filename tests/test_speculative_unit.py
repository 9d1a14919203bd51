"""Speculative decoding (engine/speculative.py) on a tiny random Llama: greedy output identical with and
without it (n-gram and draft model, mixed batches, limits inside an accepted run, prefix caching), rejection
sampling that keeps the sampling distribution exact, back-off, KV room for drafts, several tokens of a
request in one step reaching the client as one chunk."""

from __future__ import annotations

import asyncio
import itertools
import types

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from engine import metrics
from engine.kv_cache import BlockManager
from engine.llm_engine import EngineConfig, LLMClient, LLMEngine
from engine.protocol import AddRequest, StepOutputs, TokenOutput
from engine.sampler import filtered_probs
from engine.sequence import SamplingParams, Sequence
from engine.speculative import (
    BULK,
    FIRST_PAUSE,
    GATE_SAMPLES,
    NGRAM_MAX,
    NGRAM_MIN,
    DraftModel,
    NgramIndex,
    SpecState,
    Speculator,
    SpeedGate,
    _accept_sampled,
    verify,
)
from models.llama import Llama

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
EOS = 96
# Prompts whose greedy continuations (on the tiny model) repeat, so the n-gram lookup finds drafts.
PROMPTS = [[5, 7, 11, 13, 17, 5, 7, 11], [3] * 40, list(range(1, 19)) * 2, [42], [9, 8, 7, 6, 5, 4, 3, 2, 1]]

Tiny = tuple[LlamaConfig, dict[str, torch.Tensor]]


def make_engine(tiny: Tiny, speculative: str = "none", draft: Llama | None = None, **config: object) -> LLMEngine:
    hf_config, state = tiny
    settings = {"max_num_seqs": 8, "kv_cache_tokens": 4096, "max_model_len": 256, "block_size": 4, **config}
    engine_config = EngineConfig(speculative=speculative, **settings)  # type: ignore[arg-type]
    tokenizer = types.SimpleNamespace(eos_token_id=EOS)
    engine = LLMEngine(Llama.from_hf(hf_config, state), tokenizer, CPU, torch.float32, engine_config, draft=draft)
    engine.clock = itertools.count().__next__  # every step takes the same time: the speed gate stays open
    return engine


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> tuple[list[list[int]], list[str], int]:
    """Every request in one continuous batch until each finishes: tokens and finish reason per request, steps."""
    outputs: dict[int, list[int]] = {k: [] for k in range(len(requests))}
    reasons: dict[int, str] = {}
    for key, (prompt, params) in enumerate(requests):
        engine.add(AddRequest(key, prompt, params, f"r{key}"))
    steps = 0
    while engine.has_work():
        steps += 1
        for out in engine.step():
            assert out.key not in reasons, "no token after a request's last"
            if out.token is not None:
                outputs[out.key].append(out.token)
            if out.finish_reason is not None:
                reasons[out.key] = out.finish_reason
    return [outputs[k] for k in range(len(requests))], [reasons[k] for k in range(len(requests))], steps


def counters() -> tuple[float, float]:
    return metrics.SPEC_PROPOSED._value.get(), metrics.SPEC_ACCEPTED._value.get()


def index(tokens: list[int], prompt: int | None = None) -> NgramIndex:
    """An index grown as a row grows: the prompt, then the output a token or a few at a time."""
    prompt = len(tokens) if prompt is None else prompt
    seq = Sequence(prompt_ids=tokens[:prompt], params=SamplingParams())
    ngrams = NgramIndex()
    ngrams.extend(seq)
    for i in range(prompt, len(tokens), 2):
        seq.output_ids.extend(tokens[i : i + 2])
        ngrams.extend(seq)
    return ngrams


def scan(tokens: list[int], k: int, n_min: int) -> list[int]:
    """What the index must answer, by brute force: the tokens after the latest earlier occurrence (one that
    ends before the last token) of the longest suffix of NGRAM_MAX down to ``n_min`` tokens."""
    for n in range(min(NGRAM_MAX, len(tokens) - 1), n_min - 1, -1):
        ends = [e for e in range(n - 1, len(tokens) - 1) if tokens[e - n + 1 : e + 1] == tokens[-n:]]
        if ends:
            return tokens[ends[-1] + 1 : ends[-1] + 1 + k]
    return []


def test_ngram_lookup_takes_the_latest_longest_match() -> None:
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 0, 2, 3]
    assert index(tokens).lookup(3) == [4, 5, 6]  # suffix [2, 3]: its latest earlier occurrence is at 6
    assert index(tokens, prompt=4).lookup(3) == [4, 5, 6]  # the same, grown through the output
    assert index([1, 2, 3, 4]).lookup(3) == []
    assert index([7, 7, 7]).lookup(5) == [7]  # what follows, even if shorter than k
    assert index([4, 1, 2, 8, 1, 2]).lookup(2) == [8, 1]
    assert index([5, 1, 6, 2, 1]).lookup(2) == [] and index([5, 1, 6, 2, 1]).lookup(2, n_min=1) == [6, 2]
    rng = np.random.default_rng(0)
    for _ in range(300):  # small vocabularies: many repeats of every length; prompts above and below BULK
        tokens = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 200))).tolist()
        grown = index(tokens, prompt=int(rng.integers(1, len(tokens) + 1)))
        for n_min in (1, 2):
            assert grown.lookup(4, n_min) == scan(tokens, 4, n_min), (tokens, n_min)
        # Grown in chunks of up to twice BULK (a row back from a long pause extends by many tokens at once),
        # looked up after every chunk.
        seq, chunked, at = Sequence(prompt_ids=tokens[:1], params=SamplingParams()), NgramIndex(), 1
        while at < len(tokens):
            step = int(rng.integers(1, 2 * BULK))
            seq.output_ids.extend(tokens[at : at + step])
            at += step
            chunked.extend(seq)
            assert chunked.lookup(4, 1) == scan(tokens[:at], 4, 1), (tokens, at)


def test_greedy_output_is_identical_with_ngram_speculation(tiny: Tiny) -> None:
    requests = [(p, SamplingParams(max_tokens=60)) for p in PROMPTS]
    plain, plain_reasons, plain_steps = run(make_engine(tiny), requests)
    before = counters()
    engine = make_engine(tiny, "ngram")  # every step costs the same: verification is cheap
    spec, spec_reasons, spec_steps = run(engine, requests)
    proposed, accepted = (b - a for a, b in zip(before, counters(), strict=True))
    assert spec == plain and spec_reasons == plain_reasons
    assert accepted > 0 and proposed >= accepted
    assert spec_steps < plain_steps  # several tokens per step
    assert any(gate.cheap() for gate in engine.speculator.gates.values()) and engine.speculator.ngram_min == 1
    # Steps with drafts three times a plain one (a CPU): two-token matches at least, and back-off.
    costly = make_engine(tiny, "ngram")
    now = [0]

    def clock() -> int:  # read before a step's proposals and after its forward, when its drafts are still set
        now[0] += 3 if any(s.draft_ids for s in costly.scheduler.running) else 1
        return now[0]

    costly.clock = clock
    before = counters()
    assert run(costly, requests)[0] == plain
    assert counters()[0] > before[0]  # it did speculate
    assert not any(gate.cheap() for gate in costly.speculator.gates.values())
    assert costly.speculator.ngram_min == NGRAM_MIN
    # The same through the eager (prefill) path instead of the decode graphs' fixed-width verification.
    eager = make_engine(tiny, "ngram")
    eager.runner.decode.fits = lambda seqs, q=1: q == 1  # type: ignore[method-assign]
    assert run(eager, requests)[0] == plain


def test_verification_reproduces_decoding_bit_for_bit_with_int8(tiny: Tiny) -> None:
    """With int8 weights and per-token activation scales (the CPU default) a difference in the last bit of an
    attention sum can move logits far: a verification step attends one position per SDPA call, as decode
    steps do, so its logits at every position equal one-token steps' exactly and greedy output is identical
    with speculation."""
    from models.quantize import quantize_modules

    def engine(speculative: str = "none") -> LLMEngine:
        built = make_engine(tiny, speculative)
        quantize_modules(built.runner.model, "int8")
        return built

    requests = [(p, SamplingParams(max_tokens=60)) for p in PROMPTS]
    plain = run(engine(), requests)[0]
    before = counters()
    assert run(engine("ngram"), requests)[0] == plain
    assert counters()[1] > before[1]  # drafts were accepted: verification steps ran
    decode = engine().runner.decode
    q, context, blocks = 5, 40, np.arange(64 // decode.block_size)
    kv_len = next(n for n in decode.kv_lens if n >= context + q)  # the context's bucket
    for seed in range(8):  # a last-bit difference shows on some inputs only
        staged = torch.randint(0, 90, (2, 64), generator=torch.Generator().manual_seed(seed))
        logits = []
        for width in (1, q):  # one-token steps at each of the q positions, then one verification step of them all
            rows = []
            for start in range(0, q, width):
                decode.staging_np[:2, :width] = staged[:, context + start : context + start + width].numpy()
                decode.staging_np[:2, width] = context + start
                decode.staging_np[:2, width + 1 : width + 1 + len(blocks)] = blocks
                rows.append(decode.replay(2, kv_len, width + 1 + len(blocks), width)[1][: 2 * width])
            logits.append(torch.cat(rows).view(q, 2, -1).transpose(0, 1) if width == 1 else rows[0].view(2, q, -1))
        assert torch.equal(logits[0], logits[1])


def test_greedy_output_is_identical_with_a_draft_model(tiny: Tiny) -> None:
    requests = [(p, SamplingParams(max_tokens=40)) for p in PROMPTS]
    plain, _, plain_steps = run(make_engine(tiny), requests)
    config, state = tiny
    same = Llama.from_hf(config, state)  # drafting for itself: every draft is accepted
    before = counters()
    spec, _, spec_steps = run(make_engine(tiny, "draft", draft=same), requests)
    proposed, accepted = (b - a for a, b in zip(before, counters(), strict=True))
    assert spec == plain
    assert proposed > 0 and accepted == proposed
    assert spec_steps < plain_steps / 2
    torch.manual_seed(7)  # another random model: mostly wrong drafts, still the same output
    other = Llama.from_hf(config, {k: torch.randn_like(v) * 0.05 for k, v in state.items()})
    assert run(make_engine(tiny, "draft", draft=other), requests)[0] == plain


def test_mixed_batch_rows_with_and_without_speculation(tiny: Tiny) -> None:
    """Speculating rows beside rows that opt out, ask for log-probabilities or carry penalties, in one batch:
    every row gets what it gets without speculation."""
    kinds = [
        SamplingParams(max_tokens=30),
        SamplingParams(max_tokens=30, speculative=False),
        SamplingParams(max_tokens=30, logprobs=2),
        SamplingParams(max_tokens=30, presence_penalty=0.5),
        SamplingParams(max_tokens=30, temperature=0.8, seed=3, frequency_penalty=0.2),
    ]
    requests = [(p, k) for p, k in zip(PROMPTS, kinds, strict=True)]
    assert run(make_engine(tiny, "ngram"), requests)[0] == run(make_engine(tiny), requests)[0]
    # Opted in per request while the server's default is off.
    opted = [(p, SamplingParams(max_tokens=30, speculative=True)) for p in PROMPTS]
    before = counters()
    assert run(make_engine(tiny), opted)[0] == run(make_engine(tiny), [(p, kinds[0]) for p in PROMPTS])[0]
    assert counters()[0] > before[0]


def test_limits_inside_an_accepted_run(tiny: Tiny) -> None:
    """max_tokens, an end-of-sequence token and the model length cut an accepted run where decoding
    without speculation would have stopped."""
    long = [(p, SamplingParams(max_tokens=60)) for p in PROMPTS]
    plain = run(make_engine(tiny), long)[0]
    for max_tokens in (1, 2, 5, 13):
        requests = [(p, SamplingParams(max_tokens=max_tokens)) for p in PROMPTS]
        out, reasons, _ = run(make_engine(tiny, "ngram"), requests)
        assert out == [t[:max_tokens] for t in plain] and set(reasons) == {"length"}
    # An end-of-sequence token that occurs mid-output (after speculation has started).
    eos = plain[1][20]
    engine = make_engine(tiny, "ngram")
    engine.eos_ids = {eos}
    out, reasons, _ = run(engine, long[1:2])
    assert out[0] == plain[1][: plain[1].index(eos) + 1] and reasons == ["stop"]
    short = make_engine(tiny, "ngram", max_model_len=48)  # prompt of 40 tokens: 8 more
    out, reasons, _ = run(short, long[1:2])
    assert out[0] == plain[1][:8] and reasons == ["length"]


def test_prefix_cache_never_publishes_rejected_drafts(tiny: Tiny) -> None:
    """A second request whose prompt is the first one's prompt and output reuses the blocks the first one
    published (accepted tokens only): its output equals an engine's without a prefix cache."""
    engine = make_engine(tiny, "ngram")
    first_prompt = PROMPTS[2]
    (first,), _, _ = run(engine, [(first_prompt, SamplingParams(max_tokens=40))])
    follow_up = [(first_prompt + first[:30], SamplingParams(max_tokens=20))]
    cached, _, _ = run(engine, follow_up)
    assert engine.scheduler.hit_tokens > 0
    assert cached == run(make_engine(tiny, enable_prefix_caching=False), follow_up)[0]


def test_seeded_sampling_is_reproducible(tiny: Tiny) -> None:
    requests = [(p, SamplingParams(max_tokens=30, temperature=0.9, top_k=20, seed=11)) for p in PROMPTS]
    first = run(make_engine(tiny, "ngram"), requests)[0]
    assert run(make_engine(tiny, "ngram"), requests)[0] == first
    assert run(make_engine(tiny, "ngram"), list(reversed(requests)))[0] == list(reversed(first))


def test_rejection_sampling_keeps_the_distribution() -> None:
    """Emitted tokens follow the model's sampling distribution p (temperature and top-k applied), whatever
    the drafts: the first token is distributed as p at position 0, and after an accepted draft the next one
    as p at position 1. 40,000 seeded trials; the tolerance is about 4 standard errors."""
    vocab, trials = 6, 40_000
    torch.manual_seed(0)
    logits = torch.randn(3, vocab) * 1.5
    params = SamplingParams(temperature=0.7, top_k=4)
    sorted_probs, order = filtered_probs(logits, [params] * 3)
    p = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
    expected = torch.softmax(logits / 0.7, dim=-1)
    expected[expected < expected.topk(4, dim=-1).values[:, -1:]] = 0
    expected /= expected.sum(dim=-1, keepdim=True)
    assert torch.allclose(p, expected, atol=1e-6)
    generator = torch.Generator().manual_seed(5)
    for drafts in ([int(p[0].argmax()), 2], [int(p[0].argmin()), 0]):  # a likely and an impossible first draft
        first = torch.zeros(vocab)
        second = torch.zeros(vocab)
        for _ in range(trials):
            out = _accept_sampled(drafts, p, generator)
            first[out[0]] += 1
            if out[0] == drafts[0]:
                assert len(out) >= 2  # an accepted draft is always followed by another token
                second[out[1]] += 1
        assert (first / trials - p[0]).abs().max() < 4 * (0.25 / trials) ** 0.5
        if second.sum() > 1000:
            assert (second / second.sum() - p[1]).abs().max() < 4 * (0.25 / second.sum()) ** 0.5


def test_verify_greedy_and_plain_rows() -> None:
    logits = torch.full((6, 5), -1.0)
    for row, token in enumerate([2, 3, 1, 4, 0, 3]):
        logits[row, token] = 1.0
    spec = Sequence(prompt_ids=[1], params=SamplingParams())
    spec.draft_ids = [2, 3, 4]  # rows 0-3: the argmax agrees with 2 and 3, not with 4 (it says 1)
    plain = Sequence(prompt_ids=[1], params=SamplingParams())  # row 4
    last = Sequence(prompt_ids=[1], params=SamplingParams())
    last.draft_ids = []  # row 5
    assert verify(logits, [spec, plain, last], [0, 4, 5]) == [[2, 3, 1], [0], [3]]
    argmax = logits.argmax(dim=-1)  # as a CUDA graph computes it: the same tokens
    assert verify(logits, [spec, plain, last], [0, 4, 5], argmax) == [[2, 3, 1], [0], [3]]
    padded = torch.zeros(12, 5)  # a graph's layout: every sequence 4 rows wide, padding after its positions
    padded[[0, 1, 2, 3, 4, 8]] = logits
    assert verify(padded, [spec, plain, last], [0, 4, 8], padded.argmax(dim=-1)) == [[2, 3, 1], [0], [3]]


def test_back_off_pauses_a_row_whose_drafts_are_rejected() -> None:
    state = SpecState()
    speculator = Speculator("ngram", 4, True, 1000)
    seq = Sequence(prompt_ids=list(range(10)), params=SamplingParams(max_tokens=100))
    seq.spec = state
    assert speculator.plan([seq]) == [4]
    for _ in range(3):
        state.observe(4, 1)  # a quarter accepted: the rate falls, below a half k halves
    assert state.paused == 0 and speculator.plan([seq]) == [2]
    for _ in range(3):
        if not state.paused:
            state.observe(2, 0)
    assert state.paused == FIRST_PAUSE
    assert [speculator.plan([seq])[0] for _ in range(FIRST_PAUSE)] == [0] * FIRST_PAUSE
    assert speculator.plan([seq]) == [2]  # tries again, at k / 2
    for _ in range(3):
        if not state.paused:
            state.observe(2, 0)
    assert state.paused == 2 * FIRST_PAUSE  # longer each time
    seq.params = SamplingParams(max_tokens=100, logprobs=1)
    assert not speculator.eligible(seq)


def test_where_verification_is_cheap_ngram_rows_propose_every_step() -> None:
    """A GPU at small batches: a step with drafts costs about a plain one, so a row with poor acceptance keeps
    proposing (its pause is not served) and a one-token match is worth a draft; where it costs, they are not."""
    speculator = Speculator("ngram", 4, True, 1000)
    cheap, costly = speculator.gate(1), speculator.gate(8)
    for _ in range(GATE_SAMPLES):
        assert not cheap.cheap()  # not before GATE_SAMPLES steps of each kind
        for gate, spec_seconds in ((cheap, 0.011), (costly, 0.02)):
            gate.observe(False, tokens=1, rows=1, seconds=0.01)
            gate.observe(True, tokens=3, rows=1, seconds=spec_seconds)
    assert cheap.cheap() and not costly.cheap()
    seq = Sequence(prompt_ids=[5, 1, 6, 2, 1], params=SamplingParams(max_tokens=100))
    seq.spec = SpecState(rate=0.1, paused=5)
    assert speculator.plan([seq]) == [4] and seq.spec.paused == 4  # proposes, and the pause runs down all the same
    speculator.propose([seq], [4])
    assert seq.draft_ids == [6, 2, 1]  # after the one-token suffix [1]
    rows = [Sequence(prompt_ids=[5, 1, 6, 2, 1], params=SamplingParams(max_tokens=100)) for _ in range(8)]
    for row in rows:
        row.spec = SpecState(rate=0.1, paused=5)
    assert speculator.plan(rows) == [0] * 8 and all(row.spec.paused == 4 for row in rows)
    rows[0].spec = SpecState()
    ks = speculator.plan(rows)
    speculator.propose(rows, ks)
    assert ks[0] == 4 and rows[0].draft_ids == []  # no match of two tokens or more


def test_speed_gate_closes_when_speculating_is_slower() -> None:
    gate = SpeedGate()
    for _ in range(GATE_SAMPLES):
        gate.observe(False, tokens=4, rows=4, seconds=0.01)  # 100 tokens per row per second
        gate.observe(True, tokens=8, rows=4, seconds=0.01)  # 200: faster, stays open
    assert gate.open()
    for _ in range(3 * GATE_SAMPLES):
        gate.observe(True, tokens=8, rows=4, seconds=0.04)  # 50: slower than plain steps
        if gate.closed:
            break
    first = gate.closed
    assert first > 0 and not any(gate.open() for _ in range(first)) and gate.open()
    for _ in range(GATE_SAMPLES):
        gate.observe(True, tokens=8, rows=4, seconds=0.04)
    assert gate.closed == 2 * first  # still slower: a longer pause
    speculator = Speculator("ngram", 4, True, 1000)  # a gate per batch size (powers of two)
    assert speculator.gate(3) is speculator.gate(4) is not speculator.gate(1)
    only = SpeedGate()  # every step has drafts: it closes briefly to measure steps without
    for _ in range(GATE_SAMPLES):
        only.observe(True, tokens=8, rows=4, seconds=0.01)
    assert only.closed == GATE_SAMPLES


def test_speed_up_gauge_per_batch_bucket() -> None:
    """/metrics' llm_spec_speedup{batch}: the gate's tokens per row per second with drafts over without, exported
    once both kinds of step were measured at that batch size."""
    speculator = Speculator("ngram", 4, True, 1000)
    gauge = metrics.SPEC_SPEEDUP.labels(batch="4")
    gauge.set(0.0)
    speculator.timed(3, False, tokens=3, seconds=0.01)  # 100 tokens per row per second, three rows (bucket 4)
    assert gauge._value.get() == 0.0  # no step with drafts yet
    speculator.timed(4, True, tokens=6, seconds=0.01)  # 150
    assert gauge._value.get() == pytest.approx(1.5)
    assert speculator.gate(4).spec / speculator.gate(4).plain == pytest.approx(1.5)


def test_a_closed_gate_counts_only_steps_that_could_speculate() -> None:
    """Steps whose requests never speculate (not asked, or logprobs) leave a closed gate's pause as it is: with
    both kinds of request in one server, the other kind's steps would end it unserved."""
    speculator = Speculator("draft", 4, False, 1000, draft=DraftModel(runner=None))  # type: ignore[arg-type]
    gate = speculator.gate(1)
    gate.closed = 3
    plain = Sequence(prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=100))  # did not ask
    asked = Sequence(prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=100, speculative=True))
    for _ in range(10):
        assert speculator.plan([plain]) == [0]
    assert gate.closed == 3
    assert [speculator.plan([asked])[0] for _ in range(4)] == [0, 0, 0, 4]


def test_back_off_in_the_engine_stops_wrong_drafts(tiny: Tiny) -> None:
    """A draft model that is always wrong: after a few verifications rows stop proposing for a while."""
    config, state = tiny
    torch.manual_seed(3)
    wrong = Llama.from_hf(config, {k: torch.randn_like(v) for k, v in state.items()})
    engine = make_engine(tiny, "draft", draft=wrong)
    before = metrics.SPEC_VERIFIED._value.get()
    _, _, steps = run(engine, [([1, 2, 3], SamplingParams(max_tokens=100))])
    verified = metrics.SPEC_VERIFIED._value.get() - before
    assert 0 < verified < steps / 3


def test_draft_room_is_reserved_without_preempting() -> None:
    blocks = BlockManager(num_blocks=5, block_size=4)  # 4 usable blocks
    seq = Sequence(prompt_ids=list(range(6)), params=SamplingParams())
    blocks.allocate(seq)
    assert len(seq.block_table) == 2
    assert blocks.reserve(seq, 4) == 4 and len(seq.block_table) == 3  # 6 tokens + 4 drafts: 3 blocks
    assert blocks.reserve(seq, 20) == 10 and blocks.num_free == 0  # what the pool holds, no more


def test_several_tokens_of_a_step_reach_a_stream_as_one_chunk() -> None:
    """A step carrying three tokens of one request (accepted drafts) makes one chunk with all their text."""

    class Tokenizer:
        eos_token_id = 0

        def decode(self, ids: list[int], **_: object) -> str:
            return "".join(chr(96 + i) for i in ids)

        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return [chr(96 + i) for i in ids]

    async def main() -> list[str]:
        client = LLMClient(Tokenizer(), 100, lambda _: None)  # type: ignore[arg-type]
        stream = client.generate([1], SamplingParams(max_tokens=5), "r")
        chunks = []

        async def consume() -> None:
            async for chunk in stream:
                chunks.append(chunk)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        (key,) = client.requests
        client.on_step(StepOutputs([TokenOutput(key, t, None, 1, 0) for t in (1, 2, 3)], 1, 0))
        client.on_step(StepOutputs([TokenOutput(key, 4, None, 1, 0), TokenOutput(key, 5, "length", 1, 0)], 1, 0))
        await task
        assert [c.completion_tokens for c in chunks] == [3, 5]
        return [c.text for c in chunks]

    assert "".join(asyncio.run(main())) == "abcde"


def test_requests_cannot_opt_in_where_the_width_would_compile_mid_serving(tiny: Tiny) -> None:
    """With compiled steps and speculation off by default the verification width was never compiled: a
    request asking for it decodes without (compiling it then would stall every request); on by default,
    or with eager steps, it speculates."""
    seq = Sequence(prompt_ids=[1, 2], params=SamplingParams(speculative=True))
    closed = Speculator("ngram", 4, default_on=False, max_model_len=256, opt_in=False)
    assert not closed.eligible(seq)
    assert Speculator("ngram", 4, default_on=True, max_model_len=256, opt_in=False).eligible(seq)
    assert Speculator("ngram", 4, default_on=False, max_model_len=256).eligible(seq)
    engine = make_engine(tiny)  # eager CPU steps: opting in costs no compile
    assert engine.speculator.opt_in and engine.speculator.padded_width == 0


def test_padding_to_the_graphs_width_counts_when_dropping_drafts() -> None:
    """Where every row is padded to the captured width, one short draft among many rows would widen the
    whole step: the drafts are dropped (and a draft model's cache falls back to the real tokens)."""
    seqs = [Sequence(prompt_ids=[1, 2, 3, 1, 2], params=SamplingParams()) for _ in range(4)]
    for s in seqs:
        s.spec = SpecState()
    ks = [1, 0, 0, 0]  # one row proposes one token (the lookup finds 3 after [1, 2])
    padded = Speculator("ngram", 4, default_on=True, max_model_len=256, padded_width=5)
    padded.propose(seqs, ks)
    assert all(not s.draft_ids for s in seqs)
    Speculator("ngram", 4, default_on=True, max_model_len=256).propose(seqs, ks)
    assert seqs[0].draft_ids == [3]  # unpadded: a row of two positions among single-token rows is cheap
