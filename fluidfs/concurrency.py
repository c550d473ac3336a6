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
