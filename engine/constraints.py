"""Constrained decoding: a grammar matcher per sequence (llguidance) and the token masks it allows.

A constrained sequence carries an llguidance grammar (built by the API server from a JSON schema, a
regex, a list of choices or tool definitions; see server/constraints.py). The engine makes its matcher
when the sequence arrives; each step the sampler asks the batch's matchers for their masks, sets every
disallowed logit to -inf in place (on the CUDA-graph path: on the graph's output logits, so nothing is
recaptured), samples, and feeds each matcher its sampled token. Rows without a grammar cost nothing.

llguidance builds a matcher lazily (no up-front compile), so a new schema never stalls the step loop; its
token table is built once per tokenizer, on first use (:meth:`Grammars.warm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import llguidance
import llguidance.hf
import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

_EXECUTOR = llguidance.LLExecutor()  # computes a batch's masks on native threads, without the GIL


@dataclass(eq=False)
class Constraint:
    """One sequence's matcher, and the tokens that end a sequence (all a finished or broken matcher allows)."""

    matcher: llguidance.LLMatcher
    eos_ids: tuple[int, ...]

    @property
    def done(self) -> bool:
        """Matched to the end (only an end of sequence is left), or in an error state (a bug: then end too)."""
        return self.matcher.is_error() or self.matcher.is_stopped()


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


def settles(c: Constraint, token: int) -> bool:
    """Whether ``c``'s mask certainly allows ``token``, found without computing the mask (a small fraction of
    its cost: load_tests/results/constrained/lazy-cpu): where no bytes are forced, llguidance's mask
    allows exactly the tokens it validates (checked over every token of random walks through varied grammars,
    tests/test_constrained_unit.py). Where bytes are forced its mask admits only their canonical tokens, and
    whether an end of sequence is allowed is the mask's to say: there, and for a finished matcher, False."""
    if c.done or token in c.eos_ids or c.matcher.compute_ff_bytes():
        return False
    return c.matcher.validate_tokens([token]) == 1


def apply_masks(
    logits: Tensor, rows: list[int], constraints: list[Constraint], keep: list[int | None] | None = None
) -> list[int]:
    """Sets the logits of the tokens each row's matcher does not allow to -inf, in place, and returns the
    rows it masked. ``keep`` holds, per row, a token that settles the row if its grammar allows it (a greedy
    row's argmax: masking other tokens cannot change it); such a row's mask is neither computed nor applied.
    Rows without one are best masked right after the step's forward is launched: on a GPU their masks are
    computed while it runs."""
    if keep is not None:
        todo = [j for j, token in enumerate(keep) if token is None or not settles(constraints[j], token)]
        rows, constraints = [rows[j] for j in todo], [constraints[j] for j in todo]
    if not rows:
        return []
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    # Uninitialised: llguidance writes every live row whole, and a finished row is cleared below (torch.zeros
    # would fill it on torch's intra-op threads, which on a busy CPU host cost more than the fill itself).
    bitmask = torch.empty((len(rows), words), dtype=torch.int32, pin_memory=logits.is_cuda)
    words_u32 = bitmask.numpy().view(np.uint32)
    live = []
    for j, c in enumerate(constraints):
        if c.done:
            words_u32[j] = 0
            for eos in c.eos_ids:
                words_u32[j, eos // 32] |= np.uint32(1 << (eos % 32))
        else:
            live.append((c.matcher, j))
    if live:
        _EXECUTOR.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words * 4, len(rows))
    if logits.is_cuda:  # 4 bytes per 32 tokens cross the bus; the bits unpack on the device
        banned = unpack_banned(bitmask.to(logits.device, non_blocking=True), vocab)
        if len(rows) == logits.shape[0]:  # every row masked (rows ascend): one in-place fill
            logits.masked_fill_(banned, float("-inf"))
        else:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index].masked_fill(banned, float("-inf"))
        return rows
    banned_np = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, count=vocab, bitorder="little") == 0
    if logits.dtype in (torch.float32, torch.float16):  # row by row in place through numpy: one thread, no copies
        values = logits.numpy()
        for j, row in enumerate(rows):
            values[row][banned_np[j]] = -np.inf
    else:
        for j, row in enumerate(rows):
            logits[row].masked_fill_(torch.from_numpy(banned_np[j]), float("-inf"))
    return rows


def unpack_banned(bitmask: Tensor, vocab: int) -> Tensor:
    """(rows, vocab) booleans, True for each token the packed mask bans (token t is bit t % 32 of word
    t // 32); computed wherever ``bitmask`` lives."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shifts: bit 31 of a negative word comes out as 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab] == 0


def advance(constraints: list[Constraint], tokens: list[int]) -> None:
    """Feeds each matcher its row's sampled token."""
    for c, token in zip(constraints, tokens, strict=True):
        if not c.done:
            c.matcher.consume_token(token)
