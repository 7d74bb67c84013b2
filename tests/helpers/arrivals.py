"""What a peer sent, kept in order, and a wait for the first item that passes a test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import trio

__all__ = ["Arrivals"]

T = TypeVar("T")


class Arrivals(Generic[T]):
    """Items appended as they arrive; ``ended`` once no more will."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self.ended = False
        self._arrived = trio.Event()

    def add(self, item: T) -> None:
        self.items.append(item)
        self._arrived.set()
        self._arrived = trio.Event()

    def end(self) -> None:
        self.ended = True
        self._arrived.set()

    async def wait_for(self, predicate: Callable[[T], bool], source: str) -> T:
        """The first item (already arrived or future) that satisfies ``predicate``."""
        seen = 0
        while True:
            for item in self.items[seen:]:
                if predicate(item):
                    return item
            seen = len(self.items)
            if self.ended:
                raise AssertionError(f"{source} ended before the awaited item")
            await self._arrived.wait()
