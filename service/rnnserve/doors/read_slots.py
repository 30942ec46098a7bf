"""Read slots: how many request messages the server is receiving at once, and from whom.

grpc core lets a stream's sender fill only a 64 KiB window until the server asks for the message
(bdp_probe off, see server.py); once it asks, the window opens to the whole announced message, up
to --max-message-bytes. A client that announces 16 MiB and sends all but the last byte then holds
16 MiB of server memory for as long as it likes: 100 such streams on one connection took the
server from 102 to 1,713 MiB, and most of it stayed after they left. So a unary call's message is
asked for only while the call holds a slot, each slot standing for one --max-message-bytes, and a
message must arrive within a timeout: half-sent messages can hold at most `slots` messages'
memory, and not for long. A client may hold only part of the slots, so one slow or hostile
client slows its own calls, not everyone's.

This is plain asyncio, testable without grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque


class ReadSlots:
    """`slots` messages in flight at once, at most `per_client` of them one client's; waiters are
    served first come first served among the clients under their share."""

    def __init__(self, slots: int, per_client: int) -> None:
        self.per_client = per_client
        self.free = slots
        self.held: Counter[str] = Counter()
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()

    def take_now(self, client: str) -> bool:
        """The slot at once if one is free and `client` is under its share. Whoever waits while
        a slot is free is over its own share, so this overtakes nobody who could have it."""
        if self.free and self.held[client] < self.per_client:
            self._grant(client)
            return True
        return False

    async def take(self, client: str) -> None:
        if self.take_now(client):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (client, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.give_back(client)  # granted just as the caller gave up
            else:
                with contextlib.suppress(ValueError):  # _wake may have passed over it
                    self._waiters.remove(entry)
                self._wake()  # it may have been the one blocking others of its client
            raise

    def give_back(self, client: str) -> None:
        self.free += 1
        self.held[client] -= 1
        if not self.held[client]:
            del self.held[client]
        self._wake()

    def _grant(self, client: str) -> None:
        self.free -= 1
        self.held[client] += 1

    def _wake(self) -> None:
        """Grant free slots to the earliest waiters whose client is under its share."""
        if not self.free or not self._waiters:
            return
        for entry in list(self._waiters):
            if not self.free:
                break
            client, future = entry
            if self.held[client] < self.per_client:
                self._waiters.remove(entry)
                if not future.done():
                    self._grant(client)
                    future.set_result(None)


class EvictingSlots:
    """Slots for messages that are small by nature (health checks): a newcomer never waits.
    With none free it takes the place of the oldest read, whose call then fails as a timed-out
    read. A real probe's message comes with its headers and is read at the next turn of the
    event loop, so only a burst of `slots` newer calls within that turn could push it out;
    whatever the number of connections holding half messages, a probe is read at once. (Evicting
    only reads older than some age let an attack that kept arriving hold every slot young.)"""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._readers: dict[asyncio.Timeout, None] = {}
        """The reads in progress by their timeouts, oldest first."""

    def take(self, read: asyncio.Timeout) -> None:
        if len(self._readers) >= self.slots:
            oldest = next(iter(self._readers))
            del self._readers[oldest]
            if not oldest.expired():  # an expiring one is on its way out already
                oldest.reschedule(asyncio.get_running_loop().time())  # out at the next turn
        self._readers[read] = None

    def give_back(self, read: asyncio.Timeout) -> None:
        self._readers.pop(read, None)
