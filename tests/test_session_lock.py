"""SessionLock: asyncio.Lock's guarantees (one holder, first come first served, cancellation
safe) plus taking many free locks at once without an await, and a count of the held ones."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve.state.session_lock import HeldCount, SessionLock, all_free, release_all, take_all


def run(coro):
    return asyncio.run(coro)


def test_waiters_are_served_in_arrival_order() -> None:
    async def main() -> list[int]:
        lock, order = SessionLock(HeldCount()), []
        await lock.acquire()

        async def waiter(i: int) -> None:
            async with lock:
                order.append(i)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
        await asyncio.sleep(0)
        assert not lock.take()  # held: never waits, never takes
        lock.release()
        await asyncio.gather(*tasks)
        assert not lock.locked()
        return order

    assert run(main()) == [0, 1, 2, 3, 4]


def test_a_cancelled_waiter_never_holds_and_never_blocks() -> None:
    async def main() -> None:
        lock = SessionLock(HeldCount())
        await lock.acquire()
        gone = asyncio.create_task(lock.acquire())
        later = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        lock.release()
        assert await later  # the lock skipped the cancelled waiter
        assert lock.locked()
        lock.release()
        assert not lock.locked()

    run(main())


def test_a_waiter_cancelled_as_it_is_granted_passes_the_lock_on() -> None:
    async def main() -> None:
        lock = SessionLock(HeldCount())
        await lock.acquire()
        first = asyncio.create_task(lock.acquire())
        second = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0)
        lock.release()  # granted to `first`, which has not run yet
        first.cancel()
        await asyncio.sleep(0)
        assert first.cancelled()
        assert await second
        lock.release()
        assert not lock.locked()

    run(main())


def test_take_all_takes_every_lock_or_none() -> None:
    count = HeldCount()
    locks = [SessionLock(count) for _ in range(4)]
    locks[2].take()
    assert not take_all(locks)
    assert [lock.locked() for lock in locks] == [False, False, True, False]
    locks[2].release()
    assert take_all(locks) and all(lock.locked() for lock in locks)
    release_all(locks)
    assert not any(lock.locked() for lock in locks)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sets(st.integers(0, 5), min_size=1), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_holders_never_overlap(plans: list[tuple[set[int], int, bool]]) -> None:
    """Tasks take overlapping sets of locks (all at once when free, else one by one in order),
    yield a few times while holding them, and some are cancelled: no lock ever has two
    holders, every lock ends free, and nobody who was not cancelled is left waiting."""

    async def main() -> None:
        count = HeldCount()
        locks = [SessionLock(count) for _ in range(6)]
        holders: dict[int, int] = {}

        async def task(who: int, wanted: set[int], yields: int) -> None:
            mine = [locks[i] for i in sorted(wanted)]
            if not take_all(mine):
                taken = 0
                try:
                    for lock in mine:
                        await lock.acquire()
                        taken += 1
                except asyncio.CancelledError:
                    release_all(mine[:taken])
                    raise
            try:
                for i in wanted:
                    assert i not in holders, f"lock {i} held by {holders[i]} and {who}"
                    assert not all_free([locks[i]])  # the count of held locks never misses it
                    holders[i] = who
                for _ in range(yields):
                    await asyncio.sleep(0)
            finally:
                for i in wanted:
                    holders.pop(i, None)
                release_all(mine)

        before = count.held
        tasks = [
            asyncio.create_task(task(n, wanted, yields))
            for n, (wanted, yields, _) in enumerate(plans)
        ]
        await asyncio.sleep(0)
        for t, (_, _, cancel) in zip(tasks, plans, strict=True):
            if cancel:
                t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result, (_, _, cancel) in zip(results, plans, strict=True):
            assert result is None or (cancel and isinstance(result, asyncio.CancelledError))
        assert not any(lock.locked() for lock in locks)
        assert count.held == before

    run(main())


def test_each_session_table_counts_only_its_own_locks() -> None:
    """Workers of one process (tests run two) each have their tables; a lock one of them holds
    never enters another's count, which their threads would otherwise race on."""
    mine, theirs = HeldCount(), HeldCount()
    held = SessionLock(theirs)
    assert held.take()
    locks = [SessionLock(mine) for _ in range(3)]
    assert mine.held == 0 and theirs.held == 1
    assert take_all(locks) and mine.held == 3 and theirs.held == 1
    release_all(locks)
    held.release()
    assert mine.held == 0 and theirs.held == 0
