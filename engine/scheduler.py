"""Iteration-level (continuous) batching: each step either computes prompt tokens (prefill: new prompts
and chunks of long ones, within a token budget) or advances every running sequence by one token
(decode), alternating while both have work; finished sequences leave at once and free their blocks."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from engine import metrics
from engine.kv_cache import BlockManager
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.last_was_prefill = False
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which served from it
        # Whether a waiting sequence (with its uncached prompt tokens) may join the running batch now; the
        # engine's deadline rule (engine/deadlines.py). A sequence it holds back stays first in line.
        self.admit: Callable[[Sequence, int], bool] = lambda seq, own: True

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns the sequences to run this step and whether it is a prefill step.

        Prefill steps compute at most ``max_batched_tokens`` padded prompt tokens: unfinished prompts
        continue first, then waiting prompts are admitted; a prompt larger than what the budget leaves
        runs in chunks over several prefill steps (its blocks are all allocated at admission). After a
        prefill step, sequences that are ready to decode get a decode step before the next prefill
        step, so a burst of new or long prompts delays streaming clients by one chunk at a time
        instead of by every prompt's whole prefill.
        """
        ready = any(s.num_tokens - s.num_computed == 1 for s in self.running)
        if not (self.last_was_prefill and ready):
            batch = self._prefill_batch()
            if batch:
                self.last_was_prefill = True
                return batch, True
        self.last_was_prefill = False
        return self._decode_batch(), False

    def _prefill_batch(self) -> list[Sequence]:
        """Rows are padded to the longest chunk of the step, so the budget bounds rows × that width
        (mixing one long prompt with many short ones would otherwise multiply the work)."""
        batch: list[Sequence] = []
        width = 0

        def chunk(remaining: int) -> int:
            """Tokens of a prompt with ``remaining`` uncomputed ones that fit as one more row; 0 if no
            useful chunk (a block, or the whole rest if shorter) fits beside the rows already taken.
            The first row always gets the budget, so every prefill step makes progress."""
            allowed = self.max_batched_tokens // (len(batch) + 1)
            useful = max(width, min(remaining, self.blocks.block_size)) if batch else 1
            return min(remaining, allowed) if allowed >= useful else 0

        def add(seq: Sequence, n: int) -> None:
            nonlocal width
            seq.num_scheduled, width = n, max(width, n)
            batch.append(seq)

        for seq in self.running:  # prompts admitted in an earlier step, partly computed
            if seq.num_tokens - seq.num_computed > 1:
                n = chunk(seq.num_tokens - seq.num_computed)
                if not n:
                    return batch
                add(seq, n)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq)
            own = seq.num_tokens - len(cached) * self.blocks.block_size
            n = chunk(own)
            if not n or not self.blocks.can_allocate(seq, cached) or not self.admit(seq, own):
                break
            self.blocks.allocate(seq, cached)
            self._count_prefix_hit(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            add(seq, n)
        return batch

    def _decode_batch(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_tokens - seq.num_computed != 1:
                continue  # preempted earlier in this loop, or a prompt still being prefilled
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.blocks.allocate(seq)
                seq.num_scheduled = 1
                scheduled.append(seq)
        return scheduled

    def reserve_drafts(self, seqs: list[Sequence], ks: list[int]) -> list[int]:
        """KV room for the draft tokens each decode row may propose (``ks``), never preempting for it:
        what the free blocks cannot hold is proposed less."""
        return [self.blocks.reserve(seq, k) if k > 0 else 0 for seq, k in zip(seqs, ks, strict=True)]

    def _count_prefix_hit(self, seq: Sequence) -> None:
        """Every admission (re-admission after preemption included) queries the prefix cache."""
        if not self.blocks.enable_prefix_caching:
            return
        self.queried_tokens += seq.num_tokens
        self.hit_tokens += seq.num_computed
        if seq.first_scheduled_time is None:
            seq.num_cached_prompt = seq.num_computed
        metrics.PREFIX_CACHE_QUERIED.inc(seq.num_tokens)
        metrics.PREFIX_CACHE_HITS.inc(seq.num_computed)
        metrics.PREFIX_CACHE_HIT_RATE.set(self.hit_tokens / self.queried_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the KV blocks, requeue first; outputs so far are kept."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        metrics.PREEMPTIONS.inc()

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
