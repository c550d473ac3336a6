"""node/fuseloop.py: pyfuse3's read lock and readiness wait without a scheduler turn
while requests are queued, and with one at least every YIELD_AFTER_NS (a pipe stands in
for /dev/fuse: both are read when poll says POLLIN)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pyfuse3
import pytest
import trio

from fluidfs.node import fuseloop
from fluidfs.node.fuseloop import FastTrio, ReadLock, fast_session_loop


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


async def test_queued_requests_are_read_without_a_turn(pipe, monkeypatch) -> None:
    """Data already queued: a hundred waits take no turn of trio's run loop (pyfuse3's
    own trio takes one each); once it is drained, the wait parks until data comes."""
    monkeypatch.setattr(fuseloop, "YIELD_AFTER_NS", 10**12)
    r, w = pipe
    fast = FastTrio()
    os.write(w, b"x")
    with fast_session_loop(fast):
        for _ in range(100):
            await fast.lowlevel.wait_readable(r)
        assert fast.turns.turns == 0
        assert fast.readiness.skipped == 100
        os.read(r, 1)
        woke = trio.Event()

        async def waiter() -> None:
            await fast.lowlevel.wait_readable(r)
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            os.write(w, b"y")
        assert woke.is_set()
        assert fast.readiness.waited == 1


async def test_a_busy_session_still_yields_to_the_node(pipe, monkeypatch) -> None:
    """With the budget spent, every wait is a real turn: another task runs in between
    and a cancellation reaches the session loop."""
    monkeypatch.setattr(fuseloop, "YIELD_AFTER_NS", 0)
    r, w = pipe
    fast = FastTrio()
    os.write(w, b"x")
    ran = 0

    async def other() -> None:
        nonlocal ran
        while True:
            ran += 1
            await trio.lowlevel.checkpoint()

    with fast_session_loop(fast):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            for _ in range(10):
                await fast.lowlevel.wait_readable(r)
            assert ran >= 9
            nursery.cancel_scope.cancel()
        with trio.CancelScope() as scope:
            scope.cancel()
            await fast.lowlevel.wait_readable(r)
        assert scope.cancelled_caught
    assert fast.readiness.skipped == 0


async def test_a_closed_device_goes_through_trio(pipe, monkeypatch) -> None:
    """A hang-up (an unmounted device) is not POLLIN alone: trio's wait reports it."""
    monkeypatch.setattr(fuseloop, "YIELD_AFTER_NS", 10**12)
    r, w = pipe
    os.close(w)
    fast = FastTrio()
    with fast_session_loop(fast), trio.fail_after(5):
        await fast.lowlevel.wait_readable(r)
    assert (fast.readiness.skipped, fast.readiness.waited) == (0, 1)


async def test_the_read_lock_is_taken_without_a_turn_and_not_handed_over() -> None:
    """Free, the lock is taken with no turn; released with a waiter, the releaser may
    take it again at once (the waiter, woken, finds it held and waits on); the waiter
    gets it once it is really free."""
    fast = FastTrio()
    lock = fast.Lock()
    order: list[str] = []
    with fast_session_loop(fast):
        async with lock:
            pass
        assert fast.turns.turns == 0

        async def waiter() -> None:
            async with lock:
                order.append("waiter")

        async with trio.open_nursery() as nursery:
            await lock.acquire()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            lock.release()
            await lock.acquire()  # barges in: no turn, the waiter has not run
            order.append("releaser")
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["releaser"] and lock.locked()
            lock.release()
        assert order == ["releaser", "waiter"] and not lock.locked()


async def test_pyfuse3_sees_the_fast_trio_only_inside() -> None:
    before = pyfuse3.trio
    with fast_session_loop() as fast:
        assert pyfuse3.trio is fast
        assert fast.Lock is ReadLock
        assert fast.ClosedResourceError is trio.ClosedResourceError
        assert fast.lowlevel.current_task() is trio.lowlevel.current_task()
    assert pyfuse3.trio is before
