"""Worker-thread hops without trio's per-job thread naming (blocks/hop.py)."""

from __future__ import annotations

import threading

import pytest
import trio

from fluidfs.blocks.hop import ThreadHop


async def test_a_hop_runs_in_a_worker_thread_and_hands_back_the_result_or_error() -> None:
    hop = ThreadHop("test")
    here = threading.get_ident()
    assert await hop.run(lambda a, b: (a + b, threading.get_ident() != here), 2, 3) == (5, True)

    def fails() -> None:
        raise KeyError("from the worker")

    with pytest.raises(KeyError, match="from the worker"):
        await hop.run(fails)


async def test_hops_keep_their_threads_and_names() -> None:
    """A fresh machine's walk makes one hop per metadata node: tens of thousands. The
    thread is not renamed for each job (trio's ``to_thread`` names it after the job and
    back: two ctypes calls, each giving up the GIL), and sequential hops need no second
    thread; jobs in flight at once get a thread each, and no more."""
    hop = ThreadHop("test")
    names = {await hop.run(lambda: threading.current_thread().name) for _ in range(50)}
    assert len(names) == 1 and hop.threads == 1
    token = trio.lowlevel.current_trio_token()
    lock = threading.Lock()
    running: list[int] = []
    all_running = trio.Event()
    release = threading.Event()

    def blocker() -> None:
        with lock:
            running.append(1)
            third = len(running) == 3
        if third:
            trio.from_thread.run_sync(all_running.set, trio_token=token)
        release.wait(10)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(hop.run, blocker)
        await all_running.wait()
        release.set()
    assert hop.threads == 3
    await hop.run(lambda: None)
    assert hop.threads == 3


async def test_a_cancelled_caller_waits_for_its_started_job() -> None:
    """As ``to_thread.run_sync`` without abandoning: the job is not left running behind
    a caller that has moved on."""
    hop = ThreadHop("test")
    done = threading.Event()

    def slow() -> None:
        threading.Event().wait(0.2)
        done.set()

    with trio.move_on_after(0.05):
        await hop.run(slow)
    assert done.is_set()
