"""Speculative decoding: cheap proposals of the next few tokens, verified by the served model in one step.

Each decode step, a row that speculates carries up to ``k`` draft tokens after its last token; the model
computes all ``k + 1`` positions in one forward over the paged cache (a query width per row), and the
row keeps the drafts the model agrees with plus one token of the model's own. One step then yields up to
``k + 1`` tokens for about the price of one when decode is bound by reading the weights.

Proposers (both deterministic, so a draft is a point mass ``q``):

- **n-gram (prompt lookup)**: the last n tokens (n from :data:`NGRAM_MAX` down to :data:`NGRAM_MIN`, or to
  one token where verification is cheap) are looked up earlier in the row's own prompt and output (an index
  of where each n-gram last ended, grown with the row); the tokens that followed their latest occurrence
  are the drafts. Free, and right where answers quote their context (retrieval-backed support bots).
- **draft model**: a smaller model with the same tokenizer proposes ``k`` tokens greedily, with a KV
  cache of its own laid out in the served model's blocks (the same block tables, so the scheduler's
  allocation covers both); it catches up on the tokens it has not seen in one forward, then runs a
  forward per draft token, through its own decode graphs where the rows fit them.

Acceptance keeps the output exactly what decoding without speculation gives: a greedy row takes drafts
while they equal the model's argmax, then the argmax (the same tokens, up to floating-point differences
between a one-token and a wider forward); a sampled row takes draft ``x`` with probability ``p(x)`` (the
standard rule ``min(1, p(x)/q(x))`` for a point mass ``q``) and on rejection samples from ``p`` with
``x`` removed, renormalized, so every emitted token is distributed as ``p`` (temperature, top-k, top-p
applied). A seeded row draws from its own generator, so it stays reproducible (its tokens differ from
those of the same seed without speculation: same distribution, other draws).

Rows that cannot compose with speculation do not speculate: grammar-constrained rows (the matcher would
have to follow every draft), rows with presence/frequency penalties (each position's penalty depends on
the drafts before it) and rows asking for log-probabilities. Back-off: each row tracks its acceptance
(a decayed rate); below :data:`LOW_ACCEPTANCE` it stops speculating for a while (longer each time), and
between that and :data:`FULL_ACCEPTANCE` it proposes half as many tokens, so text the proposer cannot
predict costs little more than decoding without it. A step's rows are padded to its widest, so a step
whose drafts would more than double its work (:data:`MAX_PADDING`) runs without them. And engine-wide,
per batch size, :class:`SpeedGate` turns speculation off for a while when steps with drafts deliver fewer
tokens per row per second than steps without. Where the gate measures a verification step costing about a
plain one (:data:`CHEAP_VERIFY`: a GPU at small batches, whose step time is launches and weight reads, not
width), n-gram rows do not back off: a draft that is rarely right still costs next to nothing, and a row
that paused missed the passages it would have copied (load_tests/results/speculative/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from engine import metrics
from engine.sampler import filtered_probs, sample
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

Method = Literal["ngram", "draft"]
NGRAM_MAX = 4  # longest suffix looked up; longer matches are tried first
NGRAM_MIN = 2  # shortest where verification costs: a single repeated token predicts too little to pay for it
DECAY = 0.6  # weight of the history in a row's acceptance rate (the last few verifications count)
LOW_ACCEPTANCE = 0.25  # below: pause speculating
FULL_ACCEPTANCE = 0.5  # at or above: propose k tokens; between the two: k / 2
FIRST_PAUSE = 8  # decode steps without speculation after the first back-off; doubles each time, up to
MAX_PAUSE = 128
MAX_PADDING = 2.0  # a step's rows are as wide as its widest: at most this many positions per useful one
GATE_SAMPLES = 8  # decode steps of each kind measured before the speed gate may close
GATE_DECAY = 0.9  # weight of the history in the gate's speeds
GATE_REFRESH = 256  # steps with drafts after which plain steps are measured again (the load changes)
CHEAP_VERIFY = 1.25  # a verification step within this factor of a plain step's time: n-gram rows never pause


def _decayed(history: float, sample: float, seen: int) -> float:
    """The gate's decayed average with ``sample`` folded in (the sample alone when ``seen`` is 0)."""
    return GATE_DECAY * history + (1 - GATE_DECAY) * sample if seen else sample


_MASK = (1 << 64) - 1
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constants: multiplying by one permutes the keys
_SEED = 0xC2B2AE3D27D4EB4F
# The length folded into an n-gram's key, so the index holds one family of keys per length (what the keys of the
# earlier scheme got from a start per length); collisions within or across lengths are left to the token check.
_LENGTHS = [n * 0x165667B19E3779F9 & _MASK for n in range(NGRAM_MAX + 1)]
BULK = 64  # new positions from which an index extends with numpy (a prompt) instead of a Python loop


def _keys_ending(tokens: list[int], end: int, longest: int) -> list[int]:
    """The 64-bit keys of the n-grams ending at ``end``, n = 1 to ``longest``: the tokens hashed from the last
    backwards (xor-ed in, multiplied, folded), so each n-gram's state is one step from the shorter one's and all
    of them cost ``longest`` steps; the length is xor-ed into each key. Keys may collide like any 64-bit hashes:
    lookups check the tokens."""
    keys, h = [], _SEED
    for n in range(1, longest + 1):
        h = (h ^ tokens[end - n + 1]) * _MIX & _MASK
        h ^= h >> 32
        keys.append(h ^ _LENGTHS[n])
    return keys


class NgramIndex:
    """Where each n-gram (1 to :data:`NGRAM_MAX` tokens) of a row's prompt and output last ended, grown as the
    row grows: a lookup is a few dict probes, where scanning the whole text every step cost a row a tenth of
    a millisecond or more of the engine's host time, per step. N-grams are keyed by a 64-bit hash
    (:func:`_keys_ending`), so a prompt is indexed with numpy at its first decode step (milliseconds for thousands
    of tokens, where tuples took several times that); a found position is checked token by token, so a collision
    is a miss."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ends: dict[int, int] = {}  # n-gram key -> index of the n-gram's last token, latest occurrence
        self.indexed = 0  # n-grams ending before this index are in ``ends``

    def extend(self, seq: Sequence) -> None:
        """Appends what the row gained since the last call (tokens only grow: rejected drafts never enter)."""
        have, prompt = len(self.tokens), len(seq.prompt_ids)
        if have < prompt:
            self.tokens.extend(seq.prompt_ids[have:])
            have = prompt
        self.tokens.extend(seq.output_ids[have - prompt :])
        t, lo, hi = self.tokens, self.indexed, len(self.tokens) - 1  # n-grams ending in [lo, hi): each has a next
        if hi - lo >= BULK:
            base = max(lo - NGRAM_MAX + 1, 0)
            array = np.asarray(t[base:hi], dtype=np.uint64)
            ends = np.arange(lo, hi)
            h = np.full(len(ends), _SEED, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for n in range(1, NGRAM_MAX + 1):  # :func:`_keys_ending` for every end at once
                    h = (h ^ array[np.maximum(ends - n + 1 - base, 0)]) * np.uint64(_MIX)
                    h ^= h >> np.uint64(32)
                    whole = ends >= n - 1  # ends with n tokens up to them
                    keys = h[whole] ^ np.uint64(_LENGTHS[n])
                    self.ends.update(zip(keys.tolist(), ends[whole].tolist(), strict=True))  # later ends overwrite
        else:
            index = self.ends
            for end in range(lo, hi):  # _keys_ending inline: this loop runs for every row that proposes, every step
                h = _SEED
                for n in range(1, min(NGRAM_MAX, end + 1) + 1):
                    h = (h ^ t[end - n + 1]) * _MIX & _MASK
                    h ^= h >> 32
                    index[h ^ _LENGTHS[n]] = end
        self.indexed = max(lo, hi)

    def lookup(self, k: int, n_min: int = NGRAM_MIN) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix (n from
        :data:`NGRAM_MAX` down to ``n_min`` tokens) that occurred before; [] when none did."""
        t = self.tokens
        last = len(t) - 1
        keys = _keys_ending(t, last, min(NGRAM_MAX, last)) if last > 0 else []
        for n in range(len(keys), max(n_min, 1) - 1, -1):
            end = self.ends.get(keys[n - 1])
            if end is not None and t[end - n + 1 : end + 1] == t[last - n + 1 :]:
                return t[end + 1 : end + 1 + k]
        return []


@dataclass(eq=False)
class SpecState:
    """One sequence's speculation: its acceptance (back-off), the n-gram index of its tokens and how far the
    draft model's KV cache has caught up with it."""

    rate: float = 1.0  # decayed share of proposed tokens accepted
    paused: int = 0  # decode steps left without speculating
    pause: int = FIRST_PAUSE  # length of the next pause
    ngrams: NgramIndex = field(default_factory=NgramIndex)
    draft_computed: int = 0  # tokens whose KV the draft model has (in ``draft_table``'s blocks)
    draft_table: list[int] | None = None  # the block table the draft's KV was written under

    def observe(self, proposed: int, accepted: int) -> None:
        self.rate = DECAY * self.rate + (1 - DECAY) * accepted / proposed
        if self.rate < LOW_ACCEPTANCE:
            self.paused, self.pause = self.pause, min(2 * self.pause, MAX_PAUSE)
            self.rate = (LOW_ACCEPTANCE + FULL_ACCEPTANCE) / 2  # after the pause, try again at k / 2


@dataclass
class SpeedGate:
    """Back-off on measured speed, one gate per batch size (:meth:`Speculator.gate`): where a wider step
    costs more than its accepted tokens save (a CPU, whose step time grows with the tokens computed),
    acceptance alone would keep speculation on while it slows every request. The gate compares tokens per
    row per second of decode steps with drafts against those without (closing briefly to measure those when
    every step has drafts, and again every :data:`GATE_REFRESH` steps); when speculating is slower it closes
    for a pause (doubling while it stays slower), measuring plain steps meanwhile, then speculation is
    measured afresh."""

    spec: float = 0.0  # decayed tokens per row per second, steps with drafts
    plain: float = 0.0  # and without
    spec_seen: int = 0
    plain_seen: int = 0
    closed: int = 0  # decode steps left without speculation
    pause: int = 4 * FIRST_PAUSE
    spec_step: float = 0.0  # decayed seconds per step, with drafts and without
    plain_step: float = 0.0
    spec_timed: int = 0  # steps of each kind in those (never reset)
    plain_timed: int = 0

    def observe(self, speculative: bool, tokens: int, rows: int, seconds: float) -> None:
        rate = tokens / rows / max(seconds, 1e-9)
        if speculative:
            self.spec = _decayed(self.spec, rate, self.spec_seen)
            self.spec_step = _decayed(self.spec_step, seconds, self.spec_timed)
            self.spec_seen += 1
            self.spec_timed += 1
        else:
            self.plain = _decayed(self.plain, rate, self.plain_seen)
            self.plain_step = _decayed(self.plain_step, seconds, self.plain_timed)
            self.plain_seen += 1
            self.plain_timed += 1
        if self.spec_seen < GATE_SAMPLES:
            return
        if self.plain_seen < GATE_SAMPLES:  # every row speculates (a draft model): measure plain steps too
            self.closed = GATE_SAMPLES - self.plain_seen
        elif self.spec < self.plain:
            self.closed, self.pause = self.pause, min(2 * self.pause, 16 * MAX_PAUSE)
            self.spec_seen = 0
        elif self.spec_seen % GATE_REFRESH == 0:
            self.plain_seen = 0

    def open(self) -> bool:
        """Whether this decode step may speculate (a closed gate counts the step off its pause)."""
        if self.closed:
            self.closed -= 1
            return False
        return True

    def cheap(self) -> bool:
        """Whether steps with drafts have been measured (:data:`GATE_SAMPLES` of each kind at least) costing at
        most :data:`CHEAP_VERIFY` plain steps."""
        measured = min(self.spec_timed, self.plain_timed) >= GATE_SAMPLES
        return measured and self.spec_step <= CHEAP_VERIFY * self.plain_step


class DraftModel:
    """A smaller model's runner proposing drafts greedily; its KV cache is indexed by the served model's
    block tables (same block size and count), so what the scheduler allocates covers both."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        rows = []
        for s in seqs:
            state = s.spec
            assert state is not None
            if state.draft_table is not s.block_table:  # new blocks (admitted again after preemption)
                state.draft_computed, state.draft_table = 0, s.block_table
            start = min(state.draft_computed, s.num_tokens - 1)
            rows.append((s.token_ids[start:], start, s.block_table))
        tokens = self._greedy(rows)
        live = list(range(len(seqs)))
        while True:
            for i, token in zip(live, tokens, strict=True):
                drafts[i].append(token)
            live = [i for i in live if len(drafts[i]) < ks[i]]
            if not live:
                break
            # Draft j (from 0) sits at position num_tokens + j; fed back, it yields draft j + 1.
            rows = [([drafts[i][-1]], seqs[i].num_tokens + len(drafts[i]) - 1, seqs[i].block_table) for i in live]
            tokens = self._greedy(rows)
        for s, d in zip(seqs, drafts, strict=True):
            assert s.spec is not None
            s.spec.draft_computed = s.num_tokens + len(d) - 1  # the last draft was never fed back
        return drafts

    def _greedy(self, rows: list[tuple[list[int], int, list[int]]]) -> list[int]:
        """The draft's argmax after each row's last token, for rows of (tokens, position of the first, block
        table): one replay of its decode graphs when the rows fit them (one token each, or up to the
        verification width: a catch-up after a verification), else an eager forward (a first prompt)."""
        runner, q = self.runner, max(len(tokens) for tokens, _, _ in rows)
        if q > 1 and runner.decode.fixed_width:  # one captured width for catch-ups
            q = max(q, runner.verify_width)
        if runner.decode.fits_rows(len(rows), max(pos for _, pos, _ in rows), q):
            greedy, _ = runner.decode.replay(*runner.decode.stage_rows(rows, q), q)
            return greedy[[b * q + len(tokens) - 1 for b, (tokens, _, _) in enumerate(rows)]].tolist()
        return runner.forward_rows(rows).argmax(dim=-1).tolist()


def _bucket(rows: int) -> int:
    """The batch-size bucket a decode step of ``rows`` rows is measured in: the power of two at or above it."""
    return 1 << (rows - 1).bit_length()


class Speculator:
    """Decides which rows speculate and how far, proposes their drafts, and verifies them after the step."""

    def __init__(
        self,
        method: Method,
        k: int,
        default_on: bool,
        max_model_len: int,
        draft: DraftModel | None = None,
        opt_in: bool = True,
        padded_width: int = 0,
    ) -> None:
        """``opt_in``: whether a request may ask for speculation the server does not do by default (not where
        the verification width would compile mid-serving); ``padded_width``: the width every row of a
        speculative step computes (graphs or compiled steps; 0: the widest row's)."""
        if method == "draft" and draft is None:
            raise ValueError("speculative method 'draft' needs a draft model")
        self.method = method
        self.k = k
        self.default_on = default_on
        self.opt_in = opt_in
        self.padded_width = padded_width
        self.max_model_len = max_model_len
        self.draft = draft
        self.gates: dict[int, SpeedGate] = {}
        self.speedup: dict[int, Any] = {}  # llm_spec_speedup's child per batch bucket
        self.ngram_min = NGRAM_MIN  # this step's shortest n-gram (plan)

    def eligible(self, seq: Sequence) -> bool:
        """Whether the request speculates at all (its setting, and no feature that cannot compose with it)."""
        p = seq.params
        wanted = self.default_on if p.speculative is None else p.speculative and (self.default_on or self.opt_in)
        return (
            wanted
            and seq.constraint is None
            and p.logprobs is None
            and not p.presence_penalty
            and not p.frequency_penalty
        )

    def gate(self, rows: int) -> SpeedGate:
        """The speed gate of decode steps of about ``rows`` rows (powers of two): whether speculating pays
        depends on the batch (on a CPU it may alone and not among 16)."""
        return self.gates.setdefault(_bucket(rows), SpeedGate())

    def timed(self, rows: int, speculative: bool, tokens: int, seconds: float) -> None:
        """A decode step's outcome, for its batch size's speed gate and the speed-up gauge (once both kinds of
        step have been measured at that batch size)."""
        bucket = _bucket(rows)
        gate = self.gates.setdefault(bucket, SpeedGate())  # self.gate(rows), its bucket kept for the gauge
        gate.observe(speculative, tokens, rows, seconds)
        if gate.spec_timed and gate.plain_timed and gate.plain > 0:
            if bucket not in self.speedup:  # a gauge child per bucket, looked up once (this runs every step)
                self.speedup[bucket] = metrics.SPEC_SPEEDUP.labels(batch=str(bucket))
            self.speedup[bucket].set(gate.spec / gate.plain)

    def plan(self, seqs: list[Sequence]) -> list[int]:
        """Draft tokens each decode row may propose this step (0: none): its back-off, its remaining
        ``max_tokens`` (drafts beyond what it may still emit are wasted) and the model length; none while the
        speed gate is closed."""
        eligible = [self.eligible(s) for s in seqs]
        gate = self.gate(len(seqs))
        # A closed gate's pause counts steps that could have speculated: steps of requests that never do (they
        # did not ask, or cannot) would end it without the engine having done what it paused.
        if not any(eligible) or not gate.open():
            return [0] * len(seqs)
        # Proposals are free and verifying them costs about a plain step: every row proposes all it can.
        free = self.method == "ngram" and gate.cheap()
        self.ngram_min = 1 if free else NGRAM_MIN
        ks = []
        for s, ok in zip(seqs, eligible, strict=True):
            k = 0
            if ok:
                if s.spec is None:
                    s.spec = SpecState()
                paused = s.spec.paused > 0
                if paused:  # counted down while verification is cheap too: no stale pause waits for a costly step
                    s.spec.paused -= 1
                if free or not paused:
                    k = self.k if free or s.spec.rate >= FULL_ACCEPTANCE else max(1, self.k // 2)
                    k = min(k, s.params.max_tokens - len(s.output_ids) - 1, self.max_model_len - s.num_tokens)
            ks.append(max(k, 0))
        return ks

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        """Sets each row's ``draft_ids`` (at most its ``ks`` entry) and its step width."""
        rows = [i for i, k in enumerate(ks) if k > 0]
        if not rows:
            return
        if self.method == "ngram":
            drafts = []
            for i in rows:
                state = seqs[i].spec
                assert state is not None
                state.ngrams.extend(seqs[i])
                drafts.append(state.ngrams.lookup(ks[i], self.ngram_min))
        else:
            assert self.draft is not None
            drafts = self.draft.propose([seqs[i] for i in rows], [ks[i] for i in rows])
        # Every row of the step computes as many positions as the widest (padding): a few rows' drafts are not
        # worth widening a large batch.
        widest = max(1 + max(map(len, drafts)), self.padded_width)
        if len(seqs) * widest > MAX_PADDING * (len(seqs) + sum(map(len, drafts))):
            for i in rows:  # the draft model's cache holds drafts' K/V past the real tokens: not valid now
                state = seqs[i].spec
                assert state is not None
                state.draft_computed = min(state.draft_computed, seqs[i].num_tokens)
            return
        for i, d in zip(rows, drafts, strict=True):
            seqs[i].draft_ids = d
            seqs[i].num_scheduled = 1 + len(d)

    def observe(self, verified: list[tuple[Sequence, int]]) -> None:
        """After a step's verifications, (row, drafts it accepted) each, before the rows advance: back-off, and
        the draft model's cache is valid up to the accepted; metrics counted once for the step."""
        proposed = accepted = 0
        for seq, kept in verified:
            state = seq.spec
            assert state is not None
            state.observe(len(seq.draft_ids), kept)
            state.draft_computed = min(state.draft_computed, seq.num_computed + 1 + kept)
            proposed, accepted = proposed + len(seq.draft_ids), accepted + kept
        metrics.SPEC_PROPOSED.inc(proposed)
        metrics.SPEC_ACCEPTED.inc(accepted)
        metrics.SPEC_VERIFIED.inc(len(verified))


def verify(logits: Tensor, seqs: list[Sequence], starts: list[int], greedy: Tensor | None = None) -> list[list[int]]:
    """The tokens each row gains from a step whose logits are ``logits``: sequence i's ``1 + len(draft_ids)``
    positions are rows ``starts[i]`` onwards. Rows without drafts are sampled as usual (grammar masks,
    penalties and log-probabilities included); rows with drafts accept a prefix of them and add one token of
    their own. ``greedy``: the argmax of every row, where the step computed it (a CUDA graph's output): an
    all-greedy step then costs one copy of those tokens to the host."""
    plain = [i for i, s in enumerate(seqs) if not s.draft_ids]
    out: list[list[int]] = [[] for _ in seqs]
    if plain:
        index = [starts[i] for i in plain]
        tokens = sample(logits[index], [seqs[i] for i in plain], None if greedy is None else greedy[index])
        for i, token in zip(plain, tokens, strict=True):
            out[i] = [] if token is None else [token]  # None: a constrained row put off (engine/constraints.py)
    drafted = [i for i, s in enumerate(seqs) if s.draft_ids]
    if not drafted:
        return out
    argmax = (logits.argmax(dim=-1) if greedy is None else greedy).tolist()
    widths = [1 + len(s.draft_ids) for s in seqs]
    sampled = [i for i in drafted if not seqs[i].params.greedy]
    probs: dict[int, Tensor] = {}
    if sampled:
        index = [j for i in sampled for j in range(starts[i], starts[i] + widths[i])]
        params = [seqs[i].params for i in sampled for _ in range(widths[i])]
        sorted_probs, order = filtered_probs(logits[index], params)
        full = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
        at = 0
        for i in sampled:
            probs[i], at = full[at : at + widths[i]], at + widths[i]
    for i in drafted:
        s, start = seqs[i], starts[i]
        if i in probs:
            out[i] = _accept_sampled(s.draft_ids, probs[i], s.generator)
        else:
            out[i] = _accept_greedy(s.draft_ids, argmax[start : start + widths[i]])
    return out


def _accept_greedy(drafts: list[int], argmax: list[int]) -> list[int]:
    """Drafts while they equal the model's argmax at their position, then the argmax after the last one."""
    n = 0
    while n < len(drafts) and drafts[n] == argmax[n]:
        n += 1
    return [*drafts[:n], argmax[n]]


def _accept_sampled(drafts: list[int], probs: Tensor, generator: torch.Generator | None) -> list[int]:
    """Speculative rejection sampling for point-mass drafts: ``probs[j]`` is the model's sampling
    distribution at draft j's position (row ``len(drafts)``: after the last draft). Draft x is kept with
    probability p(x); a rejected one is replaced by a sample of p without x, which ends the row's run."""
    for j, x in enumerate(drafts):
        p = probs[j]
        if torch.rand((), generator=generator).item() < p[x].item():
            continue
        residual = p.clone()
        residual[x] = 0.0
        token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return [*drafts[:j], token]
    return [*drafts, int(torch.multinomial(probs[len(drafts)], 1, generator=generator))]
