"""Bounded LRU cache of finished results, in front of a batcher, and the byte-bounded LRU behind it.

Customer-service front ends classify the same short messages ("where is my order?") over and over;
answering a repeat from memory skips the queue wait and the forward pass altogether. Only the event
loop touches it (no lock); values are shared between responses and must not be mutated.

Caches keyed on client text are bounded by bytes, not only by entries: an entry count alone lets a
client that sends large distinct texts grow memory without limit (issue 18: 400 inputs of 900 KB).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from engine.metrics import RESPONSE_CACHE_HITS, RESPONSE_CACHE_MISSES, RESPONSE_CACHE_SIZE

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

RESPONSE_CACHE_BYTES = 64 * 2**20


def approx_bytes(value: object) -> int:
    """Memory held by ``value`` and what it contains (strings, numbers, tuples, lists, dicts, dataclasses),
    from ``sys.getsizeof``; shared objects count once per reference, an upper bound."""
    size = sys.getsizeof(value)
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return size
    if isinstance(value, (tuple, list, set, frozenset)):
        return size + sum(approx_bytes(v) for v in value)
    if isinstance(value, dict):
        return size + sum(approx_bytes(k) + approx_bytes(v) for k, v in value.items())
    if dataclasses.is_dataclass(value):
        return size + sum(approx_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return size


def _pair_bytes(key: object, value: object) -> int:
    return approx_bytes(key) + approx_bytes(value)


class BytesLRU(Generic[K, V]):
    """LRU mapping whose entries together hold at most ``max_bytes`` (as ``size(key, value)`` counts
    them) and, if given, at most ``max_entries``. An entry larger than ``max_bytes`` alone is not kept."""

    def __init__(
        self, max_bytes: int, max_entries: int | None = None, size: Callable[[K, V], int] = _pair_bytes
    ) -> None:
        if max_bytes < 1 or (max_entries is not None and max_entries < 1):
            raise ValueError("max_bytes and max_entries must be >= 1 (disable the cache by not creating one)")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.size = size
        self.nbytes = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        entry = self._items.get(key)
        if entry is None:
            return None
        self._items.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V) -> None:
        """Stores ``value`` as the most recently used, evicting the least recently used beyond the bounds."""
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        n = self.size(key, value)
        if n > self.max_bytes:
            return
        self._items[key] = (value, n)
        self.nbytes += n
        while self.nbytes > self.max_bytes or (self.max_entries is not None and len(self._items) > self.max_entries):
            _, (_, freed) = self._items.popitem(last=False)
            self.nbytes -= freed


class ResponseCache(Generic[K, V]):
    """``BytesLRU`` with hit/miss/size metrics labelled ``name``; ``capacity`` bounds entries (None: bytes only)."""

    def __init__(self, capacity: int | None, name: str, max_bytes: int = RESPONSE_CACHE_BYTES) -> None:
        self._lru: BytesLRU[K, V] = BytesLRU(max_bytes, capacity)
        self._hits = RESPONSE_CACHE_HITS.labels(endpoint=name)
        self._misses = RESPONSE_CACHE_MISSES.labels(endpoint=name)
        self._size = RESPONSE_CACHE_SIZE.labels(endpoint=name)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def get(self, key: K) -> V | None:
        value = self._lru.get(key)
        (self._misses if value is None else self._hits).inc()
        return value

    def put(self, key: K, value: V) -> None:
        self._lru.put(key, value)
        self._size.set(len(self._lru))
