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
