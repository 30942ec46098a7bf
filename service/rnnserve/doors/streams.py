"""Open streams, so a drain can end the idle ones at once instead of waiting out the grace
period: a stream waiting for its client's next message holds no work worth finishing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


class OpenStreams:
    def __init__(self) -> None:
        self._waiting: set[asyncio.Task] = set()
        self.closing = False

    async def requests(self, requests: AsyncIterator[T]) -> AsyncIterator[T]:
        """The stream's requests; while the handler waits for the next one, the stream counts
        as idle, and `end_idle` cancels its handler (which then answers UNAVAILABLE)."""
        task = asyncio.current_task()
        assert task is not None  # the handler's own task
        self._waiting.add(task)
        try:
            async for request in requests:
                self._waiting.discard(task)
                yield request
                if self.closing:
                    return
                self._waiting.add(task)
        finally:
            self._waiting.discard(task)

    def end_idle(self) -> int:
        """Cancel every stream waiting for a message; busy ones end after their current one."""
        self.closing = True
        idle = list(self._waiting)
        for task in idle:
            task.cancel()
        return len(idle)
