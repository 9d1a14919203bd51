"""Log-probabilities and grammar-constrained decoding inside the engine's step, on tiny random Llamas:
values against a direct log_softmax of the model's logits; every constrained output parses and validates
against its JSON schema (or matches its regex / choice), with constrained and free rows in one batch.
Unit tier, but for the hundred-generation run (integration: it takes real time)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import jsonschema
import llguidance
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engine import constraints
from engine.llm_engine import EngineConfig, LLMEngine
from engine.protocol import AddRequest
from engine.sequence import SamplingParams
from models.llama import Llama
from tests.conftest import random_weights
from tests.test_model_runner import make_runner

CPU = torch.device("cpu")


@pytest.mark.unit
def test_logprobs_match_log_softmax_of_the_model(tiny: tuple[LlamaConfig, dict[str, torch.Tensor]]) -> None:
    """Rows that ask get the sampled token's log-probability and the top k; others get nothing, and their
    tokens are what they would be alone."""
    config, state = tiny
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(state)
    runner = make_runner(config, state)
    from engine.sequence import Sequence

    params = [
        SamplingParams(max_tokens=8, logprobs=5),
        SamplingParams(max_tokens=8),
        SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=0),
    ]
    prompts = [[5, 7, 11, 13], [3] * 20, [42, 1]]
    seqs = [Sequence(prompt_ids=p, params=sp) for p, sp in zip(prompts, params, strict=True)]
    for s in seqs:
        runner.blocks.allocate(s)
    for _ in range(4):
        tokens = runner.run(seqs)
        for s, t in zip(seqs, tokens, strict=True):
            with torch.no_grad():
                logits = hf(torch.tensor([s.token_ids])).logits[0, -1]
            expected = logits.float().log_softmax(-1)
            if s.params.logprobs is None:
                assert s.logprobs is None
            else:
                assert s.logprobs is not None
                assert s.logprobs.logprob == pytest.approx(expected[t].item(), abs=1e-4)
                k = s.params.logprobs
                top = expected.topk(k) if k else None
                assert len(s.logprobs.top_ids) == k
                if top is not None:
                    assert s.logprobs.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
                    assert s.logprobs.top_ids[0] == top.indices[0].item()
            s.output_ids.append(t)
            s.num_computed = s.num_tokens - 1
            runner.blocks.allocate(s)


@pytest.mark.unit
def test_device_unpacking_of_masks_matches_numpy() -> None:
    """The CUDA path's bit unpacking (run here on CPU tensors) agrees with the CPU path's numpy unpacking,
    the sign bit of each word included."""
    import numpy as np

    torch.manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, 7), dtype=torch.int32)
    bitmask[0, 0] = -(2**31)  # only bit 31: token 31 allowed, 0-30 banned
    vocab = 7 * 32 - 5
    expected = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab] == 0
    banned = constraints.unpack_banned(bitmask, vocab)
    assert banned.tolist() == expected.tolist()
    assert banned[0, :31].all() and not banned[0, 31]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (GPT-2's byte-level alphabet) and an end-of-sequence token: 257 tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    assert len(fast) == 257
    return fast


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    tokenizer = byte_tokenizer()
    model = Llama.from_hf(*random_weights(1, vocab_size=len(tokenizer), max_position_embeddings=1024))
    engine_config = EngineConfig(max_num_seqs=16, kv_cache_tokens=16384, max_model_len=1024)
    return LLMEngine(model, tokenizer, CPU, torch.float32, engine_config)


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], str]]:
    """Every request in one continuous batch until each finishes: (tokens, finish reason) per request."""
    outputs: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    for key, (prompt, params) in enumerate(requests):
        engine.add(AddRequest(key, prompt, params, f"r{key}"))
        outputs[key] = []
    for _ in range(20_000):  # bounded: a row that is never scheduled again must fail, not hang
        if not engine.has_work():
            break
        for out in engine.step():
            if out.finish_reason is None or out.finish_reason == "length":
                outputs[out.key].append(out.token)
            if out.finish_reason is not None:
                reasons[out.key] = out.finish_reason
    assert not engine.has_work(), "requests left unfinished"
    return [(outputs[k], reasons[k]) for k in range(len(requests))]


SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "closed", "pending"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "vip"]}, "maxItems": 3},
        },
        "required": ["status"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "order": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                    "paid": {"type": "boolean"},
                    "lines": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "sku": {"type": "string", "maxLength": 4},
                                "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                            },
                            "required": ["sku", "qty"],
                            "additionalProperties": False,
                        },
                        "minItems": 1,
                        "maxItems": 2,
                    },
                },
                "required": ["id", "paid", "lines"],
                "additionalProperties": False,
            },
            "note": {"type": ["string", "null"], "maxLength": 5},
        },
        "required": ["order", "note"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 2, "maxItems": 4},
]


def generate_and_validate(engine: LLMEngine, per_schema: int) -> None:
    """``per_schema`` sampled generations per schema, constrained rows beside free ones and beside each other
    (the same prompt many times: prefix-cache hits): every output finishes, parses and validates."""
    tokenizer = engine.tokenizer
    prompt = tokenizer("Answer in JSON:").input_ids
    requests = []
    for i, schema in enumerate(SCHEMAS):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, {"whitespace_flexible": False})
        for seed in range(per_schema):
            requests.append(
                (prompt, SamplingParams(max_tokens=400, temperature=1.0, seed=1000 * i + seed, grammar=grammar))
            )
    requests.append((prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=5)))  # free, in the same batch
    results = run(engine, requests)
    for (tokens, reason), (_, params) in zip(results[:-1], requests[:-1], strict=True):
        assert reason == "stop", tokenizer.decode(tokens)
        schema = SCHEMAS[(params.seed or 0) // 1000]
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
    assert results[-1][1] == "length" and len(results[-1][0]) == 20


@pytest.mark.unit
def test_json_schemas_always_validate(engine: LLMEngine) -> None:
    generate_and_validate(engine, per_schema=2)


@pytest.mark.integration
def test_a_hundred_schema_outputs_validate(engine: LLMEngine) -> None:
    generate_and_validate(engine, per_schema=25)


@pytest.mark.unit
def test_regex_and_choice(engine: LLMEngine) -> None:
    prompt = engine.tokenizer("Pick:").input_ids
    regex = llguidance.LLMatcher.grammar_from_regex(r"[A-Z]{2}-[0-9]{2,4}")
    options = ["refund", "replace", "escalate to a human"]
    choice = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
    requests = [(prompt, SamplingParams(max_tokens=50, temperature=1.0, seed=s, grammar=regex)) for s in range(4)]
    requests += [(prompt, SamplingParams(max_tokens=50, temperature=1.0, seed=s, grammar=choice)) for s in range(4)]
    requests += [(prompt, SamplingParams(max_tokens=50, grammar=choice))]  # greedy
    for i, (tokens, reason) in enumerate(run(engine, requests)):
        text = engine.tokenizer.decode(tokens)
        assert reason == "stop"
        if i < 4:
            assert re.fullmatch(r"[A-Z]{2}-[0-9]{2,4}", text), text
        else:
            assert text in options


@pytest.mark.unit
def test_masked_logprobs_are_the_models_own(engine: LLMEngine) -> None:
    """Log-probabilities report the model's distribution, not the mask's: the constrained token's
    log-probability is below 0 even where the grammar allowed only it."""
    prompt = engine.tokenizer("x").input_ids
    grammar = llguidance.LLMatcher.grammar_from_lark('start: "yes"')
    out = engine.grammars  # the table exists once a grammar ran
    ((tokens, reason),) = run(engine, [(prompt, SamplingParams(max_tokens=10, logprobs=2, grammar=grammar))])
    assert engine.tokenizer.decode(tokens) == "yes" and reason == "stop"
    assert out.table.vocab_size == 257


@pytest.mark.unit
def test_greedy_rows_whose_argmax_is_allowed_skip_the_mask_with_the_same_tokens() -> None:
    """With a precomputed argmax (the decode step's) on a CPU, a greedy row without penalties whose argmax its
    grammar allows is left unmasked and keeps it; every row's token and matcher state equal those of the
    path that masks every row and searches again."""
    from engine import sampler
    from engine.sequence import Sequence

    tokenizer = byte_tokenizer()
    grammars = constraints.Grammars(tokenizer, len(tokenizer))
    letters = llguidance.LLMatcher.grammar_from_regex("[a-c]{2,5}")
    a, z = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("z")
    params = [
        SamplingParams(grammar=letters),  # argmax allowed: kept unmasked
        SamplingParams(grammar=letters),  # argmax banned: masked, searched again
        SamplingParams(grammar=letters, frequency_penalty=5.0),  # penalized: masked
        SamplingParams(grammar=letters, temperature=1.0, seed=7),  # sampled: masked
        SamplingParams(),  # free
    ]

    def batch() -> list[Sequence]:
        seqs = [Sequence(prompt_ids=[1, 2], params=p) for p in params]
        for s in seqs:
            s.output_ids = [a]
            s.constraint = grammars.constraint(letters) if s.params.grammar else None
            if s.constraint is not None:
                s.constraint.matcher.consume_token(a)
        return seqs

    torch.manual_seed(0)
    logits = torch.randn(len(params), len(tokenizer))
    logits[[0, 2], a] = 50.0
    logits[[1, 3, 4], z] = 50.0
    fast, full = batch(), batch()
    kept = logits.clone()
    fast_tokens = sampler.sample(kept, fast, kept.argmax(dim=-1))
    full_tokens = sampler.sample(logits.clone(), full)
    assert fast_tokens == full_tokens
    assert fast_tokens[0] == a and fast_tokens[1] != z and fast_tokens[4] == z
    assert torch.equal(kept[0], logits[0]) and torch.isinf(kept[1]).any()  # row 0 unmasked, row 1 masked
    for f, g in zip(fast, full, strict=True):
        if f.constraint is not None and g.constraint is not None:
            assert f.constraint.matcher.compute_bitmask() == g.constraint.matcher.compute_bitmask()


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on JSON-like text: multi-byte tokens such as ``{"``, ``":`` and whole
    keys, which is where llguidance's mask (canonical tokens for forced bytes) and its validation can differ."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        json.dumps({"name": "Ann Lee", "age": 41, "tags": ["red", "blue"], "address": {"city": "Oslo", "zip": "0150"}}),
        json.dumps([{"id": i, "score": i / 7, "ok": i % 2 == 0, "note": None} for i in range(20)]),
        json.dumps(["apple", "banana split", "hello world", "quick brown fox", "yes", "no", "maybe not"]),
    ] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.unit
def test_settles_agrees_with_the_mask_on_every_token() -> None:
    """``settles`` is True only for tokens the mask allows: an end of sequence where the grammar accepts; where
    no token is forced, every other token the mask allows (it validates); where tokens are forced, the first
    canonical token of the forced bytes alone; checked over the whole vocabulary at each step of random walks
    (tokens drawn from the mask) through varied grammars."""
    import random

    import numpy as np

    tokenizer = bpe_tokenizer()
    vocab = len(tokenizer)
    grammars = constraints.Grammars(tokenizer, vocab)
    sources = [constraints_grammar(s) for s in SCHEMAS]
    sources += [
        constraints_grammar({"type": "object"}),
        constraints_grammar({"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 3}),
        llguidance.LLMatcher.grammar_from_regex(r"[A-Z][a-z]{2,5} [0-9]{1,3}( [a-z]+)?"),
        llguidance.LLMatcher.grammar_from_lark('start: "yes" | "no" | "maybe not"'),
        llguidance.LLMatcher.grammar_from_lark(  # a tool call as server/services/tools.py asks (JSON with spaces)
            'start: call ("\\n" call)*\ncall: "<tool_call>" %json ' + json.dumps(SCHEMAS[0]) + ' "</tool_call>"'
        ),
    ]
    rng = random.Random(0)
    checked = forced = lead = accepting = 0
    for grammar in sources:
        for _ in range(3):
            c = grammars.constraint(grammar)
            for _ in range(60):
                if c.done:
                    break
                mask = np.frombuffer(c.matcher.compute_bitmask(), dtype=np.uint8)
                allowed = np.unpackbits(mask, bitorder="little")[:vocab].astype(bool)
                settled = np.array([constraints.settles(c, t) for t in range(vocab)])
                assert not (settled & ~allowed).any()  # never keeps a token the mask bans
                ends = list(c.eos_ids)
                assert (settled[ends] == allowed[ends]).all()  # an end where the grammar accepts
                accepting += bool(allowed[ends].any())
                settled[ends] = False
                if c.matcher.compute_ff_bytes() and c.matcher.compute_ff_tokens():
                    assert settled.sum() == 1  # the first canonical token of the forced bytes
                    forced += 1
                else:  # nothing forced, or bytes that begin a longer token (no token forced): what validates
                    lead += bool(c.matcher.compute_ff_bytes())
                    open_tokens = allowed.copy()
                    open_tokens[ends] = False
                    assert (settled == open_tokens).all()
                    checked += 1
                choices = [t for t in np.nonzero(allowed)[0].tolist() if t not in c.eos_ids] or c.eos_ids
                assert c.matcher.consume_token(rng.choice(choices))
    assert checked > 100 and forced > 10 and lead > 10 and accepting > 10


def constraints_grammar(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, {"whitespace_flexible": False})


@pytest.mark.unit
def test_masks_computed_while_waiting_for_the_argmax_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose masks were computed while the argmax was on its way (on a GPU: during the forward) are
    settled from those masks: the same rows masked, the same logits, as when nothing was computed early."""
    tokenizer = byte_tokenizer()
    grammars = constraints.Grammars(tokenizer, len(tokenizer))
    letters = llguidance.LLMatcher.grammar_from_regex("[a-c]{2,5}")
    a, b, z = (tokenizer.convert_tokens_to_ids(t) for t in "abz")
    keep = [a, z, b, z, a, None, z, a, z]  # z is banned; None: no argmax to keep
    forced = llguidance.LLMatcher.grammar_from_regex("ab[a-c]{1,3}")  # the last two rows: "ab" forced
    monkeypatch.setattr(constraints, "_THREADS", 2)  # two rows per early chunk

    def masked(waits: int) -> tuple[list[int], torch.Tensor]:
        rules = [grammars.constraint(letters) for _ in keep[:-2]] + [grammars.constraint(forced) for _ in "ab"]
        forced_rows = [constraints._expected(c) != constraints._OPEN for c in rules]
        assert forced_rows == [False] * 7 + [True] * 2  # computed early first
        logits = torch.randn(len(keep) + 1, len(tokenizer), generator=torch.Generator().manual_seed(0))
        calls = iter([False] * waits + [True] * 10)
        rows = list(range(1, len(keep) + 1))  # row 0 free
        masked_rows, put_off = constraints.apply_masks(logits, rows, rules, lambda: keep, lambda: next(calls))
        assert put_off == []
        return masked_rows, logits

    plain_rows, plain = masked(0)
    assert plain_rows == [2, 4, 6, 7, 9]
    for waits in (1, 2, 4):
        early_rows, early = masked(waits)
        assert early_rows == plain_rows and torch.equal(early, plain)
    assert torch.isinf(plain[2, z]) and not torch.isinf(plain[[0, 1, 3, 5, 8]]).any()


@pytest.mark.unit
def test_taken_tokens_reach_the_matcher_as_if_consumed_at_once() -> None:
    """A token taken is fed on the matcher's next use: the matcher's masks then equal those of a matcher fed
    each token directly."""
    tokenizer = bpe_tokenizer()
    grammars = constraints.Grammars(tokenizer, len(tokenizer))
    text = json.dumps({"name": "Ann Lee", "age": 41, "tags": ["red", "blue"]}, separators=(",", ":"))
    tokens = tokenizer.encode(text)
    grammar = constraints_grammar({"type": "object"})
    direct, lazy = (grammars.constraint(grammar) for _ in range(2))
    for token in tokens:
        direct.matcher.consume_token(token)
        lazy.take(token)
        assert lazy._pending == token
        assert lazy.matcher.compute_bitmask() == direct.matcher.compute_bitmask()  # read: fed now
        assert lazy._pending is None
    assert not direct.matcher.is_error() and direct.matcher.is_accepting()


@pytest.mark.unit
def test_server_json_grammar_allows_a_few_spaces_or_newlines_between_tokens() -> None:
    """The server's JSON grammars take a model's own layout (a newline after "[", indentation) but not unbounded
    blank space: at most eight spaces or newlines between two JSON tokens."""
    from server.services.constraints import json_schema

    tokenizer = byte_tokenizer()
    grammars = constraints.Grammars(tokenizer, len(tokenizer))
    grammar = json_schema({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}, "f")

    def accepts(text: str) -> bool:
        c = grammars.constraint(grammar)
        ids = tokenizer.encode(text)
        return c.matcher.validate_tokens(ids) == len(ids) and c.matcher.consume_tokens(ids) and c.matcher.is_accepting()

    assert accepts('{"a":[1,2]}') and accepts('{\n  "a": [\n    1,\n    2\n  ]\n}')
    assert accepts("{" + " " * 8 + '"a":[]}') and not accepts("{" + " " * 9 + '"a":[]}')
    assert not accepts('{\t"a":[]}')


@pytest.mark.unit
def test_rows_put_off_are_masked_first_in_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``defer``, a row whose argmax its grammar bans and whose mask is not computed is put off: its logits
    and matcher untouched, marked lagging. Run again, the sampler masks it and takes its argmax again before
    that argmax is sent to the host (on a GPU: queued behind the forward, no wait): the same logits and
    tokens as masking it at once, and it is not put off twice."""
    from engine import sampler

    tokenizer = byte_tokenizer()
    grammars = constraints.Grammars(tokenizer, len(tokenizer))
    letters = llguidance.LLMatcher.grammar_from_regex("[a-c]{2,5}")
    a, z = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("z")
    rules = [grammars.constraint(letters) for _ in range(8)]
    logits = torch.randn(8, len(tokenizer), generator=torch.Generator().manual_seed(0))
    keep = [a, z, z, a, a, a, a, a]  # two of eight banned: within the limit
    monkeypatch.setattr(constraints, "_THREADS", 4)  # the limit's round of mask threads, whatever this host has
    rows = list(range(8))
    assert constraints._put_off_limit(8) == 2
    masked, put_off = constraints.apply_masks(logits.clone(), rows, rules, lambda: keep, lambda: True, True)
    assert (masked, put_off) == ([], [1, 2])
    assert [c.lagging for c in rules] == [False, True, True] + [False] * 5
    before = [c.matcher.compute_bitmask() for c in rules]

    sent: list[list[int]] = []  # the argmax as it was sent to the host
    host_argmax = sampler._argmax_on_host

    def spied(greedy: torch.Tensor) -> tuple:
        sent.append(greedy.tolist())
        return lambda: True, host_argmax(greedy)[1]

    monkeypatch.setattr(sampler, "_argmax_on_host", spied)
    seqs = [SimpleNamespace(params=SamplingParams(), output_ids=[]) for _ in rows]
    again = logits.clone()
    greedy = torch.tensor(keep)
    chosen, put_off, host = sampler._mask(again, seqs, rows, rules, greedy)  # type: ignore[arg-type]
    at_once = logits.clone()
    constraints.apply_masks(at_once, [1, 2], [grammars.constraint(letters) for _ in range(2)])
    assert put_off == [] and not any(c.lagging for c in rules)
    assert torch.equal(again[1:3], at_once[1:3]) and torch.equal(again[[0, *range(3, 8)]], logits[[0, *range(3, 8)]])
    expected = [a, *at_once[1:3].argmax(dim=-1).tolist(), *[a] * 5]
    assert sent == [expected] and host == expected and chosen is not None and chosen.tolist() == expected
    assert greedy.tolist() == keep  # the step's own argmax (a graph's buffer) is not written
    assert [c.matcher.compute_bitmask() for c in rules] == before  # nothing was fed to a matcher put off
    monkeypatch.undo()
    monkeypatch.setattr(constraints, "_THREADS", 4)
    many = [z, z, z, a, a, a, a, a]  # three of eight banned: over the limit, all masked at once
    masked, put_off = constraints.apply_masks(logits.clone(), rows, rules, lambda: many, lambda: True, True)
    assert (masked, put_off) == ([0, 1, 2], []) and not any(c.lagging for c in rules)


@pytest.mark.unit
def test_rows_that_may_end_are_not_put_off() -> None:
    """An end of sequence settles a row whose grammar accepts or has finished, and a finished row whose argmax
    is not an end is masked at once (its mask, ends only, costs nothing): neither is put off."""
    tokenizer = byte_tokenizer()
    grammars = constraints.Grammars(tokenizer, len(tokenizer))
    letters = llguidance.LLMatcher.grammar_from_regex("[a-c]{2,5}")
    a, z = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("z")
    rules = [grammars.constraint(letters) for _ in range(8)]
    for c, n in zip(rules, [2, 5, 5, 0, 0, 0, 0, 0], strict=True):  # accepting; finished; finished
        for _ in range(n):
            c.matcher.consume_token(a)
    assert rules[0].matcher.is_accepting() and not rules[0].done and rules[1].done
    eos = rules[0].eos_ids[0]
    logits = torch.randn(8, len(tokenizer), generator=torch.Generator().manual_seed(0))
    keep = [eos, eos, z, a, a, a, a, a]
    masked, put_off = constraints.apply_masks(logits, list(range(8)), rules, lambda: keep, lambda: True, True)
    assert (masked, put_off) == ([2], [])
    assert logits[2].isfinite().sum() == 1 and logits[2, eos].isfinite()  # ends only


@pytest.mark.unit
def test_engine_runs_rows_put_off_again_with_the_same_outputs(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy constrained rows put off while their masks are computed (forced here on the CPU, where the engine
    never defers) run again at the same position: every output equals the run that masks at once, and
    validates."""
    from engine import metrics, sampler

    tokenizer = engine.tokenizer
    prompt = tokenizer("Answer in JSON:").input_ids
    requests = []
    for schema in SCHEMAS:
        grammar = constraints_grammar(schema)
        requests += [(prompt, SamplingParams(max_tokens=200, grammar=grammar))]
        requests += [(prompt[:-1], SamplingParams(max_tokens=200, grammar=grammar))]
    requests.append((prompt, SamplingParams(max_tokens=20)))  # free, in the same batch
    # and one speculating (n-gram drafts from its repetitive prompt): constrained rows then pass through
    # verification steps too
    requests.append((tokenizer("abcabcabcabcabcabc").input_ids, SamplingParams(max_tokens=30, speculative=True)))
    at_once = run(engine, requests)
    short_at_once = run(engine, [(tokenizer("[").input_ids, params) for _, params in requests[:-2]])
    host_argmax = sampler._argmax_on_host
    monkeypatch.setattr(sampler, "_argmax_on_host", lambda greedy: (lambda: True, host_argmax(greedy)[1]))
    monkeypatch.setattr(constraints, "_put_off_limit", lambda rows: rows)
    before = metrics.GRAMMAR_PUT_OFF._value.get()
    verified = metrics.SPEC_VERIFIED._value.get()
    put_off = run(engine, requests)
    assert metrics.GRAMMAR_PUT_OFF._value.get() - before > 10
    assert metrics.SPEC_VERIFIED._value.get() > verified
    assert put_off == at_once
    # Prompts of one token: their prefill is a step of one position per row (the decode step's path), where a
    # row put off must be computed again too, not left with nothing to compute.
    short = [(tokenizer("[").input_ids, params) for _, params in requests[:-2]]
    assert all(len(prompt) == 1 for prompt, _ in short)
    before = metrics.GRAMMAR_PUT_OFF._value.get()
    assert run(engine, short) == [(list(tokens), reason) for tokens, reason in short_at_once]
    assert metrics.GRAMMAR_PUT_OFF._value.get() > before
    for (tokens, reason), (_, params) in zip(put_off[:-2], requests[:-2], strict=True):
        assert reason == "stop", tokenizer.decode(tokens)
        schema = SCHEMAS[[constraints_grammar(s) for s in SCHEMAS].index(params.grammar)]
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
