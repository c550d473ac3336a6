"""Small structured-concurrency helpers shared by the parts (trio nurseries only)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")


async def map_limited(
    job: Callable[[T], Awaitable[R]],
    items: Sequence[T],
    limit: int,
    catch: type[Exception] | tuple[type[Exception], ...] = Exception,
) -> list[R]:
    """``await job(item)`` for every item, at most *limit* at once; the results in the
    items' order. The first exception of a *catch* type cancels the jobs still running
    and is raised as itself, not in an exception group (callers catch their own error
    types); any other exception leaves the nursery as trio raises it."""
    results: list[R | None] = [None] * len(items)
    failed: list[Exception] = []
    room = trio.Semaphore(limit)

    async def one(i: int, item: T) -> None:
        async with room:
            try:
                results[i] = await job(item)
            except catch as exc:
                failed.append(exc)
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i, item in enumerate(items):
            nursery.start_soon(one, i, item)
    if failed:
        raise failed[0]
    return results  # type: ignore[return-value]  # every job returned, or one failed


class ByteBudget:
    """Bytes a part may hold at once (shards waiting for upload, say): ``take`` waits
    while they would go past *limit*. One item larger than the whole budget is let
    through when nothing else is held, so no size of item waits for ever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    def try_take(self, n: int) -> bool:
        """Take *n* bytes if they fit now (True), else take nothing (False)."""
        if n and self.used and self.used + n > self.limit:
            return False
        self.used += n
        return True

    async def take(self, n: int) -> None:
        """Take *n* bytes, waiting until they fit."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.try_take(n):
            await self._lot.park()

    def give(self, n: int) -> None:
        """Give back *n* bytes taken before, waking the waiters to try again."""
        self.used -= n
        self._lot.unpark_all()


async def start_in_waves(
    pending: Callable[[], int],
    take: Callable[[], Callable[[], Awaitable[None]]],
    wait_queued: Callable[[], Awaitable[None]],
    at_once: int,
    wave: int,
) -> None:
    """Until cancelled: run the queued jobs, at most *at_once* at a time, started in waves
    of *wave* (or all *pending* ones, if fewer).

    *take* removes the next job from the queue; *wait_queued* returns once more are
    queued. Jobs started in one step ask for their shards in that step, so their requests
    to each peer share one ``RetrieveShards`` call (blocks/shardbatch.py); one started
    whenever another ended would go alone. A job's exception ends the whole."""
    running = 0
    room = trio.Event()

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        nonlocal running
        try:
            await job()
        finally:
            running -= 1
            room.set()

    async with trio.open_nursery() as nursery:
        while True:
            if not pending():
                await wait_queued()
                continue
            free = at_once - running
            if free < min(wave, pending()):
                room = trio.Event()
                await room.wait()
                continue
            for _ in range(min(free, pending())):
                running += 1
                nursery.start_soon(run, take())
