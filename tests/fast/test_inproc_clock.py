"""The fast tests' virtual clock (inproc.thread_aware_clock): time jumps when the run is idle,
but not while a worker thread is still working, however long the machine makes it wait.

A plain autojump clock failed the first test: after 0.05 s of real idleness it jumped to
the timeout while the thread was still busy (on a loaded machine, a thread waiting that
long for a CPU timed out calls in the tests that use this clock)."""

from __future__ import annotations

import threading
import time

import trio
from inproc import busy_threads, thread_aware_clock

THRESHOLD = 0.05


def test_no_jump_past_a_timeout_while_a_worker_thread_works() -> None:
    clock = thread_aware_clock(THRESHOLD)
    wait = clock.thread_wait

    def work() -> None:
        """Busy until the clock put off a jump for us (the run idle meanwhile), and a
        few thresholds more, 10 s at most."""
        end = time.monotonic() + 10
        while wait.held < 3 and time.monotonic() < end:
            pass

    async def main() -> None:
        with trio.fail_after(1):  # virtual: a jump would end it at once
            await trio.to_thread.run_sync(work)
        assert trio.current_time() == 0, "no virtual time passed while the thread worked"

    trio.run(main, clock=clock)
    assert wait.held >= 3


def test_an_idle_run_jumps_at_once() -> None:
    async def main() -> None:
        started = time.monotonic()
        await trio.sleep(3600)
        assert trio.current_time() == 3600
        assert time.monotonic() - started < 30

    trio.run(main, clock=thread_aware_clock(THRESHOLD))


def test_a_thread_busy_past_the_patience_no_longer_holds_time() -> None:
    """The thread spins until the sleep has ended (30 s at most): a fixed spin of 1 s
    could end first on a machine that kept the loop from a CPU that long."""
    clock = thread_aware_clock(THRESHOLD, patience=4 * THRESHOLD)
    done: list[str] = []

    def spin_until_slept() -> None:
        end = time.monotonic() + 30
        while "sleep" not in done and time.monotonic() < end:
            pass

    async def work() -> None:
        await trio.to_thread.run_sync(spin_until_slept)
        done.append("thread")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            await trio.sleep(3600)
            done.append("sleep")

    trio.run(main, clock=clock)
    assert done == ["sleep", "thread"], "time jumped while the thread still spun"


def test_busy_threads_sees_a_working_thread_only() -> None:
    """The thread is busy while it works, idle once trio has it back between jobs (other
    tests' threads may still be winding down: only this one is looked at)."""
    worker: list[int] = []
    looked = threading.Event()

    def work() -> None:
        """Busy until the loop has looked (30 s at most): a fixed spin could end before a
        loaded machine gave the loop a CPU."""
        worker.append(threading.get_native_id())
        end = time.monotonic() + 30
        while not looked.is_set() and time.monotonic() < end:
            pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, work)
            seen = False
            end = time.monotonic() + 30
            while not seen and time.monotonic() < end:
                seen = bool(worker) and worker[0] in busy_threads()
                await trio.sleep(0.01)
            looked.set()
            assert seen
        end = time.monotonic() + 5
        while worker[0] in busy_threads() and time.monotonic() < end:  # (going back to sleep)
            await trio.sleep(0.01)
        assert worker[0] not in busy_threads(), "trio's idle cached worker sleeps"

    trio.run(main)
