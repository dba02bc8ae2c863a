"""A least-recently-used map bounded by the total size of its values, not their number.

The in-process memories of immutable message data (recipient lists, encoded
bodies) hold values of very different sizes: a bound on entries would not bound
memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Sized, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Sized)


class SizedLRU(Generic[K, V]):
    def __init__(self, max_size: int, size: Callable[[V], int] = len):
        self._items: OrderedDict[K, V] = OrderedDict()
        self._max_size = max_size
        self._size_of = size
        self._size = 0

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Keep `value`, evicting the least recently used; a value larger than the
        whole bound is not kept (and evicts nothing)."""
        size = self._size_of(value)
        if size > self._max_size:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= self._size_of(old)
        self._items[key] = value
        self._size += size
        while self._size > self._max_size:
            self._size -= self._size_of(self._items.popitem(last=False)[1])

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def keys(self) -> list[K]:
        return list(self._items)
