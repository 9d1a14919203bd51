"""Bounded LRU cache of finished results, in front of a batcher.

Customer-service front ends classify the same short messages ("where is my order?") over and over;
answering a repeat from memory skips the queue wait and the forward pass altogether. Only the event
loop touches it (no lock); values are shared between responses and must not be mutated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from engine.metrics import RESPONSE_CACHE_HITS, RESPONSE_CACHE_MISSES, RESPONSE_CACHE_SIZE

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ResponseCache(Generic[K, V]):
    def __init__(self, capacity: int, name: str) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1 (disable the cache by not creating one)")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._hits = RESPONSE_CACHE_HITS.labels(endpoint=name)
        self._misses = RESPONSE_CACHE_MISSES.labels(endpoint=name)
        self._size = RESPONSE_CACHE_SIZE.labels(endpoint=name)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is None:
            self._misses.inc()
            return None
        self._items.move_to_end(key)
        self._hits.inc()
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        self._size.set(len(self._items))
