"""Iteration-level (continuous) batching: each step either admits waiting prompts (prefill) or advances
every running sequence by one token (decode); finished sequences leave at once and free their blocks."""

from __future__ import annotations

from collections import deque

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
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which served from it

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns the sequences to run this step and whether it is a prefill step.

        Prefill goes first so new requests get their first token quickly; a prompt that would not fit
        the token budget waits for the next step, except when it is alone (it always fits the pool
        because the engine rejects requests longer than ``max_model_len``).
        """
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq)
            need = seq.num_tokens - len(cached) * self.blocks.block_size
            if (batch and tokens + need > self.max_batched_tokens) or not self.blocks.can_allocate(seq, cached):
                break
            self.blocks.allocate(seq, cached)
            self._count_prefix_hit(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            batch.append(seq)
            tokens += need
        if batch:
            self.running.extend(batch)
            return batch, True

        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.blocks.allocate(seq)
                scheduled.append(seq)
        return scheduled, False

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
