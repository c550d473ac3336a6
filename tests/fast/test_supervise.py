"""Background loops run supervised: a failure is logged and the loop restarted with back-off,
never the end of the node; cancellation passes through (fluidfs/node/supervise.py).

Run on trio's MockClock (autojump): hours of virtual time take milliseconds.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import trio
import trio.testing

from fluidfs.node import supervise as sup


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def run(fn, clock) -> None:
    trio.run(fn, clock=clock)


def test_a_loop_that_keeps_failing_is_restarted_with_bounded_back_off(mock_clock, caplog):
    starts: list[float] = []

    async def broken() -> None:
        starts.append(trio.current_time())
        raise ValueError("x is not an address")

    state = sup.Supervised("broken")

    async def main() -> None:
        with trio.move_on_after(3600):
            await sup.supervise("broken", broken, state=state)

    caplog.set_level(logging.INFO, logger="fluidfs.node.supervise")
    run(main, mock_clock)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 1, 2, 4, ... seconds, then never more often than once a minute: no busy spin.
    assert gaps[:6] == [1, 2, 4, 8, 16, 32]
    assert all(gap == sup.BACKOFF_MAX for gap in gaps[6:])
    assert len(starts) < 3600 / sup.BACKOFF_MAX + 10
    assert state.failures == len(starts) and "ValueError" in state.last_error
    # The first failure with its traceback, then at most one line a minute.
    records = [r for r in caplog.records if r.name == "fluidfs.node.supervise"]
    assert records[0].exc_info is not None
    assert len(records) <= 3600 / sup.LOG_EVERY + 1


def test_cancellation_passes_through_and_a_finished_loop_is_not_restarted(mock_clock):
    runs = {"done": 0, "forever": 0}

    async def done() -> None:
        runs["done"] += 1

    async def forever() -> None:
        runs["forever"] += 1
        await trio.sleep_forever()

    async def main() -> None:
        await sup.supervise("done", done)
        with trio.move_on_after(5) as scope:
            await sup.supervise("forever", forever)
        assert scope.cancelled_caught

    run(main, mock_clock)
    assert runs == {"done": 1, "forever": 1}


def test_a_loop_failing_inside_its_own_nursery_is_contained(mock_clock):
    """A failure in a child task arrives as an exception group: still contained."""
    attempts = []

    async def loop() -> None:
        attempts.append(trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise KeyError("boom")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.supervise, "nested", loop)
            await trio.sleep(10)
            nursery.cancel_scope.cancel()

    run(main, mock_clock)
    assert len(attempts) == 4  # t = 0, 1, 3, 7


def test_back_off_starts_over_after_a_healthy_run(mock_clock):
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(trio.current_time())
        if len(starts) == 4:
            await trio.sleep(sup.HEALTHY_AFTER)  # a long healthy run, then a failure
        raise OSError("disk hiccup")

    async def main() -> None:
        with trio.move_on_after(sup.HEALTHY_AFTER + 20):
            await sup.supervise("flaky", flaky)

    run(main, mock_clock)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[:3] == [1, 2, 4]
    assert gaps[3] == sup.HEALTHY_AFTER + 1  # back to the minimum pause


def test_base_exceptions_are_not_swallowed(mock_clock):
    async def interrupted() -> None:
        raise KeyboardInterrupt

    async def main() -> None:
        await sup.supervise("interrupted", interrupted)

    with pytest.raises(KeyboardInterrupt):
        run(main, mock_clock)
