"""Constrained decoding: a grammar matcher per sequence (llguidance) and the token masks it allows.

A constrained sequence carries an llguidance grammar (built by the API server from a JSON schema, a
regex, a list of choices or tool definitions; see server/services/constraints.py). The engine makes its matcher
when the sequence arrives; each step the sampler asks the batch's matchers for their masks, sets every
disallowed logit to -inf in place (on the CUDA-graph path: on the graph's output logits, so nothing is
recaptured), samples, and feeds each matcher its sampled token. Rows without a grammar cost nothing. A
greedy row whose most likely token its grammar allows needs no mask: one token is checked instead
(:func:`settles`), which costs a small fraction of a mask where nearly every token is allowed (inside a
JSON string, the costliest case). On a GPU, where a few greedy rows of a batch have argmaxes their grammars
ban, they are not masked at once: their tokens are put off a step (:attr:`Constraint.lagging`) and their
masks computed during the next step's forward, so the batch does not wait for them after its forward.

llguidance builds a matcher lazily (no up-front compile), so a new schema never stalls the step loop; its
token table is built once per tokenizer, on first use (:meth:`Grammars.warm`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import llguidance
import llguidance.hf
import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

_EXECUTOR = llguidance.LLExecutor()  # computes a batch's masks on native threads, without the GIL
# Rows computed per call while waiting for a step's argmax: about one per executor thread (80% of the cores).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # Linux only
_THREADS = min(32, max(1, _CORES * 4 // 5))


class Constraint:
    """One sequence's matcher, and the tokens that end a sequence (all a finished or broken matcher allows).

    A sampled token is fed to the matcher when the matcher is next read (:meth:`take`), not when it is
    sampled: on a GPU that is during the next step's forward, which the host otherwise spends waiting."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: tuple[int, ...]) -> None:
        self._matcher = matcher
        self.eos_ids = eos_ids
        self._pending: int | None = None
        # Its argmax was banned and its token put off: the row runs again and its mask is computed first.
        self.lagging = False

    @property
    def matcher(self) -> llguidance.LLMatcher:
        """The matcher, caught up with every token taken."""
        if self._pending is not None:
            self._matcher.consume_token(self._pending)
            self._pending = None
        return self._matcher

    def take(self, token: int) -> None:
        """Records the row's sampled token, fed to the matcher on its next use."""
        if not self.done:
            self._pending = token

    @property
    def done(self) -> bool:
        """Matched to the end (only an end of sequence is left), or in an error state (a bug: then end too)."""
        matcher = self.matcher
        return matcher.is_error() or matcher.is_stopped()


class Grammars:
    """Matchers for one tokenizer and a model whose logits have ``vocab_size`` columns."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._table: llguidance.LLTokenizer | None = None

    @property
    def table(self) -> llguidance.LLTokenizer:
        if self._table is None:
            self._table = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
        return self._table

    def constraint(self, grammar: str) -> Constraint:
        """A matcher at the start of ``grammar``; one the library refuses is in its error state (the
        API server validated the grammar already, so that means a bug, and the row then may only end)."""
        return Constraint(llguidance.LLMatcher(self.table, grammar), tuple(self.table.eos_tokens))

    def warm(self) -> None:
        """Builds the token table and walks one small grammar, so the first constrained request does not pay it."""
        self.constraint(llguidance.LLMatcher.grammar_from_regex("[a-z]{1,3}")).matcher.compute_bitmask()


def validate(grammar: str) -> str | None:
    """Why llguidance cannot use ``grammar`` (an unsupported schema keyword, a bad regex), or None."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return (messages[0] if messages else "invalid grammar") if is_error else None


_OPEN = -1  # no bytes forced: a token settles its row if the matcher validates it


def settles(c: Constraint, token: int) -> bool:
    """Whether ``c``'s mask certainly allows ``token``, found without computing the mask (a small fraction of
    its cost: load_tests/results/constrained/lazy-cpu). Where no token is forced (no bytes are, or the forced
    bytes begin a longer token, as a string's opening quote does), llguidance's mask allows exactly the
    tokens it validates; where tokens are forced it admits their canonical tokens (the first of which is the
    one settled here: any other is the mask's to judge). An end of sequence is allowed where the grammar
    accepts or has finished. All checked over every token at each step of random walks through varied
    grammars (tests/test_constrained_unit.py)."""
    return _settled(c, _expected(c), token)


def _expected(c: Constraint) -> int | None:
    """What can settle ``c`` before its token is known: :data:`_OPEN` (any token it validates), the first
    forced token (that one alone), or None (it is done: an end of sequence alone)."""
    if c.done:
        return None
    if c.matcher.compute_ff_bytes():
        forced = c.matcher.compute_ff_tokens()
        if forced:
            return forced[0]
    return _OPEN


def _settled(c: Constraint, expected: int | None, token: int) -> bool:
    if token in c.eos_ids:  # allowed once the grammar may end (all a finished one allows)
        return expected is None or c.matcher.is_accepting()
    if expected is None:
        return False
    if expected != _OPEN:
        return token == expected
    return c.matcher.validate_tokens([token]) == 1


def apply_masks(
    logits: Tensor,
    rows: list[int],
    constraints: list[Constraint],
    keep: Callable[[], list[int | None]] | None = None,
    ready: Callable[[], bool] | None = None,
    defer: bool = False,
) -> tuple[list[int], list[int]]:
    """Sets the logits of the tokens each row's matcher does not allow to -inf, in place; returns the rows it
    masked and the rows it put off. ``keep`` gives, per row, a token that settles the row if its grammar
    allows it (a greedy row's argmax: masking other tokens cannot change it); such a row is left unmasked,
    and its mask is computed only where :func:`settles` cannot tell. What can settle each row is found before
    ``keep`` is asked. Until ``ready()`` says ``keep`` would not wait (on a GPU, for the forward), other rows'
    masks are computed a few at a time, starting with the rows whose tokens are forced, which one token alone
    settles. With ``defer`` (a GPU: the next forward hides a mask), a batch larger than a round of the mask
    threads computes none of those, and where the rows whose tokens do not settle and whose masks are not
    computed are few (:func:`_put_off_limit`) they are put off: left unmasked, their matchers untouched,
    marked :attr:`Constraint.lagging` (the caller drops their tokens, runs them again and masks them at once:
    engine/sampler.py). Rows come in with that mark cleared."""
    if not rows:
        return [], []
    masks = _Bitmask(constraints, logits.shape[-1], pinned=logits.is_cuda)
    todo = list(range(len(rows)))
    put_off: list[int] = []
    for c in constraints:
        c.lagging = False
    if keep is not None:
        expected = [_expected(c) for c in constraints]
        if ready is not None and not (defer and len(rows) > _THREADS) and not ready():
            early = sorted(todo, key=lambda j: expected[j] == _OPEN)
            for start in range(0, len(rows), _THREADS):
                if ready():
                    break
                masks.compute(early[start : start + _THREADS])
        tokens = keep()

        def unsettled(j: int) -> bool:
            token = tokens[j]
            if token is None:
                return True
            if masks.computed[j]:
                return not masks.allows(j, token)
            return not _settled(constraints[j], expected[j], token)

        todo = [j for j in todo if unsettled(j)]
        masks.compute([j for j in todo if expected[j] is None])  # finished: no mask to wait for (ends only)
        if defer:
            unmasked = [j for j in todo if not masks.computed[j] and tokens[j] is not None]
            if len(unmasked) <= _put_off_limit(len(rows)):
                put_off = unmasked
                for j in put_off:
                    constraints[j].lagging = True
                todo = [j for j in todo if not constraints[j].lagging]
        masks.compute(todo)  # the rows not settled: their masks may yet allow the token
        todo = [j for j in todo if tokens[j] is None or not masks.allows(j, tokens[j])]
    masks.compute(todo)
    masks.apply(logits, [rows[j] for j in todo], todo)
    return [rows[j] for j in todo], [rows[j] for j in put_off]


def _put_off_limit(rows: int) -> int:
    """How many of ``rows`` greedy rows may be put off in one step: a row put off gives up its share of a step,
    while a round of masks waited for after the forward costs a good part of one; so a few rows against the
    batch (a quarter at most), whose masks fit in one round beside the next forward."""
    return min(_THREADS, rows // 4)


class _Bitmask:
    """Packed masks of some constrained rows (token t is bit t % 32 of word t // 32), each computed once, on
    request."""

    def __init__(self, constraints: list[Constraint], vocab: int, pinned: bool) -> None:
        self.constraints = constraints
        self.vocab = vocab
        self.words = (vocab + 31) // 32
        # Uninitialised: llguidance writes every row it computes whole, and a finished row is set below
        # (torch.zeros fills on torch's intra-op threads, which on a busy CPU host cost more than the fill).
        self.bits = torch.empty((len(constraints), self.words), dtype=torch.int32, pin_memory=pinned)
        self.computed = [False] * len(constraints)

    def compute(self, js: range | list[int]) -> None:
        words_u32 = self.bits.numpy().view(np.uint32)
        live = []
        for j in js:
            if self.computed[j]:
                continue
            self.computed[j] = True
            c = self.constraints[j]
            if c.done:
                words_u32[j] = 0
                for eos in c.eos_ids:
                    words_u32[j, eos // 32] |= np.uint32(1 << (eos % 32))
            else:
                live.append((c.matcher, j))
        if live:
            _EXECUTOR.unsafe_compute_mask_ptr(live, self.bits.data_ptr(), self.words * 4, len(self.constraints))

    def allows(self, j: int, token: int) -> bool:
        """Whether row ``j``'s (computed) mask allows ``token``."""
        return bool(self.bits.numpy().view(np.uint32)[j, token // 32] >> (token % 32) & 1)

    def apply(self, logits: Tensor, rows: list[int], js: list[int]) -> None:
        """Bans in ``logits[rows[k]]`` what the mask of row ``js[k]`` bans (each computed)."""
        if not rows:
            return
        bits = self.bits if len(js) == len(self.constraints) else self.bits[js]
        if logits.is_cuda:  # 4 bytes per 32 tokens cross the bus; the bits unpack on the device
            if bits is not self.bits:  # a gathered copy: pinned, so its copy to the device does not wait either
                bits = bits.pin_memory()
            banned = unpack_banned(bits.to(logits.device, non_blocking=True), self.vocab)
            if rows == list(range(logits.shape[0])):  # every row: one in-place fill
                logits.masked_fill_(banned, float("-inf"))
            else:
                index = device_index(rows, logits.device)
                logits[index] = logits[index].masked_fill(banned, float("-inf"))
            return
        banned_np = np.unpackbits(bits.numpy().view(np.uint8), axis=-1, count=self.vocab, bitorder="little") == 0
        if logits.dtype in (torch.float32, torch.float16):  # row by row in place through numpy: one thread, no copy
            values = logits.numpy()
            for k, row in enumerate(rows):
                values[row][banned_np[k]] = -np.inf
        else:
            for k, row in enumerate(rows):
                logits[row].masked_fill_(torch.from_numpy(banned_np[k]), float("-inf"))


def device_index(rows: list[int], device: torch.device) -> Tensor:
    """``rows`` as an index on ``device``; to a GPU through pinned memory, so the host does not wait for the work
    queued there (``torch.tensor(rows, device=...)`` would: a synchronous copy)."""
    index = torch.tensor(rows)
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index


def unpack_banned(bitmask: Tensor, vocab: int) -> Tensor:
    """(rows, vocab) booleans, True for each token the packed mask bans (token t is bit t % 32 of word
    t // 32); computed wherever ``bitmask`` lives."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shifts: bit 31 of a negative word comes out as 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab] == 0


def advance(constraints: list[Constraint], tokens: list[int | None]) -> None:
    """Gives each matcher its row's sampled token (fed to it on its next use); None: the row's token was put off."""
    for c, token in zip(constraints, tokens, strict=True):
        if token is not None:
            c.take(token)
