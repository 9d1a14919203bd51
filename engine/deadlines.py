"""Deadline-aware admission: the engine does not start work that cannot finish before its deadline, and
refuses (sheds) a waiting request once it can no longer make it, instead of running it into a 504.

Under overload every admitted request used to wait, start and run into its deadline: 64 prompts of 2,048
tokens with 512 new tokens each on CPU all ended in 504 at 120 s, none finished (issue 18 item 13). Two
rules, at every step, from the speed the engine measures (:class:`StepRates`):

- **Shed** (:func:`unreachable`): a waiting sequence whose estimated finish passes its deadline is
  refused at once (the API answers 503 with Retry-After): the prompt tokens queued ahead of it and its
  own are prefilled (with a decode step between prefill steps while others decode), then it decodes
  its ``max_tokens``. The ones behind it no longer count its prompt.
- **Protect** (:func:`admissible`): a waiting sequence joins the running batch only if the running
  sequences that can still finish in time still can with it: its prefill steps go between their decode
  steps and its tokens make each decode step slower. It waits otherwise (and is shed when it can no
  longer make it). On a CPU, where a decode step's time grows with the tokens in the batch, this is
  what keeps a batch from growing until no one in it finishes.

The estimates are optimistic where they cannot know (a batch slot and KV-cache room are assumed free
when a sequence's turn comes; later arrivals are not foreseen), and nothing is shed or held before the
speed has been measured on real work. Only sequences that have not started are shed. A sequence that
would start on an idle engine is never shed: alone, its own ``max_tokens`` may take longer than its
deadline and it may still stop earlier (past its deadline it ends in 504 as before).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import numpy as np

from engine.sequence import Sequence

# Weight of the history in the decayed sums: about the last 1 / (1 - DECAY) steps count.
DECAY = 0.95
# Evidence needed before an estimate may shed or hold anything: until then a rate counts as unknown (free).
MIN_PREFILL_TOKENS = 256
MIN_DECODE_STEPS = 4
# Contexts must have varied by this many tokens (standard deviation) before a decode step's growth with
# them is fitted: a slope from a narrow range is noise, and extrapolated it would shed on noise.
MIN_CONTEXT_SPREAD = 256


@dataclass
class StepRates:
    """The engine's measured speed, as decayed sums (recent steps count most, so it follows the load).

    Prefill: seconds per token, time over tokens, so big steps weigh by their size and tiny ones
    (dominated by fixed costs) barely count. Decode: a step's time as ``a + b * context``, fitted by
    least squares on the tokens the batch attends to (a step reads every weight once, the ``a``, and
    every sequence's KV cache, the ``b``: on a CPU a batch of long sequences is many times slower)."""

    _pre_s: float = 0.0
    _pre_tokens: float = 0.0
    _pre_seen: int = 0  # undecayed evidence
    _w: float = 0.0  # decode: decayed weights, sums of x (context), y (seconds), x*x, x*y
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0
    _dec_seen: int = 0

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self._pre_s = DECAY * self._pre_s + seconds
        self._pre_tokens = DECAY * self._pre_tokens + tokens
        self._pre_seen += tokens

    def observe_decode(self, context: int, seconds: float) -> None:
        """One decode step over sequences holding ``context`` tokens together."""
        x, y = float(context), seconds
        self._w = DECAY * self._w + 1.0
        self._x = DECAY * self._x + x
        self._y = DECAY * self._y + y
        self._xx = DECAY * self._xx + x * x
        self._xy = DECAY * self._xy + x * y
        self._dec_seen += 1

    def prefill_s(self, tokens: int) -> float:
        """Estimated seconds to prefill ``tokens``; 0 before enough prefill was measured."""
        if self._pre_seen < MIN_PREFILL_TOKENS or tokens <= 0:
            return 0.0
        return tokens * self._pre_s / self._pre_tokens

    def decode_s(self, context: int | np.ndarray) -> float | np.ndarray:
        """Estimated seconds of one decode step over ``context`` tokens (elementwise for an array); 0 before
        enough were measured."""
        if self._dec_seen < MIN_DECODE_STEPS:
            return 0.0
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        slope = (self._xy / self._w - mean_x * mean_y) / var if var >= MIN_CONTEXT_SPREAD**2 else 0.0
        # Never faster for longer contexts, never growing faster than in proportion to the context (a step
        # also has costs that do not grow with it): both only noise could suggest.
        slope = min(max(slope, 0.0), mean_y / max(mean_x, 1.0))
        return np.maximum(mean_y + slope * (context - mean_x), 0.0)

    @property
    def measured(self) -> bool:
        return self._pre_seen >= MIN_PREFILL_TOKENS or self._dec_seen >= MIN_DECODE_STEPS


def prefill_left(seq: Sequence) -> int:
    """Tokens a sequence still has to compute before it decodes (prompt, or prompt + output after a
    preemption); 0 for one already decoding."""
    left = seq.num_tokens - seq.num_computed
    return left if left > 1 else 0


def tokens_left(seq: Sequence) -> int:
    return max(seq.params.max_tokens - len(seq.output_ids), 1)


def _finish(
    rates: StepRates,
    now: float,
    prefill: int,
    budget: int,
    decoding: bool,
    steps: int | np.ndarray,
    batch: int,
    context: int,
) -> float | np.ndarray:
    """When a sequence finishes (elementwise for an array of ``steps``): ``prefill`` tokens (ahead of it and
    its own) are computed in steps of at most ``budget``, a decode step after each while something decodes,
    then its ``steps`` decode steps in a batch of ``batch`` sequences holding ``context`` tokens, each step
    adding one token to each."""
    between = -(-prefill // budget) * rates.decode_s(context) if decoding else 0.0
    step = rates.decode_s(context + batch * steps // 2)  # the average step: the contexts grow as they decode
    return now + rates.prefill_s(prefill) + between + steps * step


def unreachable(
    running: Collection[Sequence],
    waiting: Iterable[Sequence],
    rates: StepRates,
    now: float,
    budget: int,
    uncached: Callable[[Sequence], int],
) -> list[Sequence]:
    """The waiting sequences (in queue order) to shed. ``now`` is on the clock of the deadlines;
    ``uncached(seq)``: a waiting sequence's tokens not in the prefix cache; ``budget``: prefill tokens
    per step."""
    if not rates.measured:
        return []
    ahead = sum(prefill_left(s) for s in running)
    context, batch = sum(s.num_tokens for s in running), len(running)
    shed = []
    for i, seq in enumerate(waiting):
        own = uncached(seq)
        idle = i == 0 and not running
        if seq.deadline is not None and seq.first_scheduled_time is None and not idle:
            steps = tokens_left(seq) - 1
            finish = _finish(rates, now, ahead + own, budget, batch > 0, steps, batch + 1, context + seq.num_tokens)
            if finish > seq.deadline:
                shed.append(seq)
                continue
        ahead += own
        context += seq.num_tokens
        batch += 1
    return shed


def admissible(
    seq: Sequence, running: Collection[Sequence], rates: StepRates, now: float, budget: int, own: int
) -> bool:
    """Whether ``seq`` (``own`` tokens to prefill) may join ``running`` without making a running sequence
    that would finish before its deadline miss it. Sequences already estimated late do not hold others
    back (their lateness is theirs: a deadline shorter than their own work, or an estimate since proven
    wrong), so one request with an impossible deadline cannot stop admission. The running sequences are
    estimated together (arrays): the scheduler asks once per sequence it admits, and a wave of new requests
    beside hundreds of running ones would otherwise cost the engine thread a walk of them per admission."""
    if not rates.measured or not running:
        return True
    timed = [other for other in running if other.deadline is not None]
    if not timed:
        return True
    ahead = sum(prefill_left(s) for s in running)
    context, batch = sum(s.num_tokens for s in running), len(running)
    decoding = any(prefill_left(s) == 0 for s in running)
    steps = np.fromiter((tokens_left(other) for other in timed), dtype=np.int64, count=len(timed))
    deadlines = np.fromiter((other.deadline for other in timed), dtype=np.float64, count=len(timed))
    on_time = _finish(rates, now, ahead, budget, decoding, steps, batch, context) <= deadlines  # late: not held
    with_it = _finish(rates, now, ahead + own, budget, True, steps[on_time], batch + 1, context + seq.num_tokens)
    return bool(np.all(with_it <= deadlines[on_time]))
