"""Tokenizing prompts off the event loop when they are long (shared by the generation and encoder paths)."""

from __future__ import annotations

import asyncio
import copy
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

T = TypeVar("T")

# Texts from this many characters are tokenized (and chats rendered) on a worker thread, shorter ones on the
# event loop, where they cost less than the hop; longer ones, encoded on the loop, stall every stream
# and probe the process serves (load_tests/results/tokenize_offload/results.md).
OFF_LOOP_CHARS = 1024
_WORKER = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # one: an API server's share of the host's cores
_worker_copies: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, PreTrainedTokenizerBase] = (
    weakref.WeakKeyDictionary()
)


async def _tokenize(
    tokenizer: PreTrainedTokenizerBase, n_chars: int, work: Callable[[PreTrainedTokenizerBase], T]
) -> T:
    """``work(tokenizer)`` on the loop for short texts, else on the worker thread with a copy of the
    tokenizer of its own: an HF tokenizer sets per-call flags on its Rust backend (split_special_tokens,
    which keeps chat content from forging control tokens), so one instance must never encode on two
    threads at once."""
    if n_chars < OFF_LOOP_CHARS:
        return work(tokenizer)
    own = _worker_copies.get(tokenizer)
    if own is None:
        own = _worker_copies[tokenizer] = copy.deepcopy(tokenizer)
    return await asyncio.get_running_loop().run_in_executor(_WORKER, work, own)
