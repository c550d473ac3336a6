"""fluidfs/concurrency.py: jobs at most *limit* at once, results in order, the first
error of the caller's types raised as itself with the other jobs cancelled."""

from __future__ import annotations

import pytest
import trio

from fluidfs.concurrency import map_limited


async def test_results_come_in_order_and_no_more_than_the_limit_run_at_once() -> None:
    running = peak = 0

    async def job(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.01 * (5 - n % 5))  # later items finish first
        running -= 1
        return n * n

    assert await map_limited(job, list(range(12)), 3) == [n * n for n in range(12)]
    assert peak == 3


async def test_the_first_error_is_raised_as_itself_and_the_rest_are_cancelled() -> None:
    finished: list[int] = []

    async def job(n: int) -> int:
        if n == 1:
            raise KeyError(n)
        await trio.sleep(10)
        finished.append(n)
        return n

    with trio.fail_after(5), pytest.raises(KeyError):
        await map_limited(job, [0, 1, 2, 3], 4, KeyError)
    assert finished == []


async def test_an_error_of_another_type_leaves_in_a_group() -> None:
    async def job(n: int) -> int:
        raise ValueError(n)

    with pytest.raises(ExceptionGroup):
        await map_limited(job, [0], 1, KeyError)
