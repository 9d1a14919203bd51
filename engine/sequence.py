"""Per-request generation state, owned by the engine thread."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.constraints import Constraint
    from engine.protocol import TokenLogprobs
    from engine.speculative import SpecState


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    # Prefix-cache isolation: sequences share cached KV blocks only when their salts are equal (None
    # shares with None). The server passes a hash of the client's API key, so one client cannot learn
    # another's prompt from cached_tokens (issue 18); it does not affect sampling.
    cache_salt: str | None = None
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the k most likely
    grammar: str | None = None  # an llguidance grammar the output must match (engine/constraints.py)
    speculative: bool | None = None  # speculative decoding for this request; None: the server's default

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    key: int = -1  # the API server's key for the request (engine/protocol.py); -1 outside the engine
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_scheduled: int = 0  # tokens the current step computes (a prompt chunk); 0 = all not yet computed
    num_cached_prompt: int = 0  # tokens served from the prefix cache at first admission
    num_committed: int = 0  # leading blocks published to the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # prefix hashes of the full blocks so far
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    deadline: float | None = None  # perf_counter time by which the request must be answered (engine/deadlines.py)
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # the grammar's matcher, made by the engine (engine/constraints.py)
    logprobs: TokenLogprobs | None = None  # the latest sampled token's, when params.logprobs asks
    draft_ids: list[int] = field(default_factory=list)  # speculative tokens this step verifies after the last
    spec: SpecState | None = None  # speculation's per-sequence state (engine/speculative.py)

    def __post_init__(self) -> None:
        if self.params.seed is not None and not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_step_tokens(self) -> int:
        return self.num_scheduled or self.num_tokens - self.num_computed

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def step_token_ids(self) -> list[int]:
        """The tokens this step computes: uncomputed ones (a prompt chunk, or the last token), then drafts."""
        return (self.token_ids[self.num_computed :] + self.draft_ids)[: self.num_step_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
