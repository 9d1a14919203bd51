"""Paged KV-cache bookkeeping: fixed-size blocks handed to sequences from a free pool, with automatic
prefix caching.

The tensors themselves live in the model runner; this module only decides which block holds which
token, so sequences of any length share one preallocated pool without fragmentation.

Prefix caching (as vLLM's automatic prefix caching): every *full*, computed block is named by a hash
of its tokens chained with its parent block's hash, so a hash identifies the whole prefix up to and
including that block. A new sequence whose leading full blocks hash to blocks already in the cache
shares them (reference counted) and skips their prefill. The chain starts from the sequence's cache
salt (``SamplingParams.cache_salt``), so only sequences with the same salt (the same API key, unless
the operator shares the cache across keys) share blocks. A freed block keeps its hash and stays
reusable until the pool runs short and evicts it, least recently freed first; blocks without a hash
are always handed out before cached ones.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.sequence import Sequence

SCRATCH_BLOCK = 0  # never handed out: padding tokens write their K/V here
_ROOT_HASH = b""


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """SHA-256 rather than Python's ``hash``: a collision would silently serve another prompt's K/V."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def root_hash(cache_salt: str | None) -> bytes:
    """Parent of a sequence's first block: chains with different salts never meet (vLLM's ``cache_salt``).
    A salted root is 32 bytes, so a salted first block hashes a longer input than any unsalted one."""
    if cache_salt is None:
        return _ROOT_HASH
    return hashlib.sha256(b"cache_salt\0" + cache_salt.encode()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # no hash; pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but hashed, least recently freed first
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # prefix hash → block holding it

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unused blocks included: they are evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Prefix hashes of the sequence's first ``num_blocks`` full blocks, extended lazily (tokens only
        ever get appended, so a computed hash never changes)."""
        bs, hashes = self.block_size, seq.block_hashes
        tokens = seq.token_ids if len(hashes) < num_blocks else []
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else root_hash(seq.params.cache_salt)
            hashes.append(block_hash(parent, tokens[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest cached prefix of full blocks of a sequence with no blocks yet.

        The last token is never matched: the step that admits the sequence must compute at least one
        token to produce the logits of the next one.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return []
        matched = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(h)
            if block is None:
                break
            matched.append(block)
        return matched

    def can_allocate(self, seq: Sequence, cached: list[int] | None = None) -> bool:
        """Whether every token the sequence has now fits, reusing the ``cached`` prefix blocks."""
        cached = cached or []
        new = self.blocks_needed(seq.num_tokens) - len(seq.block_table) - len(cached)
        revived = sum(1 for b in cached if self._ref[b] == 0)  # taken out of the evictable pool
        return new + revived <= self.num_free

    def allocate(self, seq: Sequence, cached: list[int] | None = None) -> None:
        """Make room for every token the sequence has now (prompt, or prompt + output on re-admission).

        ``cached`` (from :meth:`match_prefix`, only for a sequence with no blocks yet) become the head of
        its block table and count as computed.
        """
        if cached:
            assert not seq.block_table, "a cached prefix only applies to a sequence being admitted"
            for block in cached:
                if self._ref[block] == 0:
                    del self._evictable[block]
                self._ref[block] += 1
            seq.block_table = list(cached)
            seq.num_computed = len(cached) * self.block_size
            seq.num_committed = len(cached)
        for _ in range(self.blocks_needed(seq.num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            h = self._hash[block]
            self._hash[block] = None
            if h is not None and self._cached.get(h) == block:
                del self._cached[h]
        self._ref[block] = 1
        return block

    def reserve(self, seq: Sequence, extra: int) -> int:
        """Blocks for up to ``extra`` tokens past the sequence's own (speculative drafts), as far as the pool
        allows; returns how many such tokens its blocks now hold. Drafts that get rejected leave their K/V
        in these blocks past ``num_computed``: overwritten later, never published (:meth:`commit`)."""
        wanted = self.blocks_needed(seq.num_tokens + extra) - len(seq.block_table)
        for _ in range(min(wanted, self.num_free)):
            seq.block_table.append(self._take())
        return min(extra, len(seq.block_table) * self.block_size - seq.num_tokens)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step (one more token) fits."""
        return self.blocks_needed(seq.num_tokens) <= len(seq.block_table) or self.num_free > 0

    def commit(self, seq: Sequence) -> None:
        """Publish the sequence's full, computed blocks to the prefix cache (call after each step).

        A block whose prefix is already cached in another block (two identical prompts prefilled in
        the same step) stays private and returns to the plain pool when freed.
        """
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_committed:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_committed, full):
            block = seq.block_table[i]
            if hashes[i] not in self._cached:
                self._cached[hashes[i]] = block
                self._hash[block] = hashes[i]
        seq.num_committed = full

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody uses go back to the pool, hashed ones as
        evictable, tail blocks ahead of head blocks (a longer prefix is less likely to be reused)."""
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_committed = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
