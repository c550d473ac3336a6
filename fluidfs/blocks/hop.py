"""Worker-thread hops for small, frequent jobs, without trio's per-job thread naming.

A fresh machine's walk opens and parses one metadata node per hop (blocks/remote.py's
``fetch_parsed``): tens of thousands of hops of a few hundred microseconds each.
``trio.to_thread.run_sync`` names the worker thread after the job and back again on
every one (two ``pthread_setname_np`` calls through ctypes, each dropping and taking
back the GIL the loop is using), builds the name from the calling task's, copies the
context and goes through its thread cache: py-spy of the mount during a fresh ``find``
put the naming alone at ~30 % of the worker threads' busy samples.

``ThreadHop`` keeps long-lived threads that take jobs from one queue and hand each
result back to the caller's trio run (``TrioToken.run_sync_soon``), as to_thread does.
A thread is started only when every thread it has is busy, so there are never more
than the most jobs ever in flight at once: callers bound that with their limiter, as
they did for ``to_thread``. Threads are daemons and wait for jobs forever.

Cancellation is as ``to_thread.run_sync`` without ``abandon_on_cancel``: a job that has
started runs to its end and its caller gets the result; the cancellation is delivered
at the caller's next checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_names = itertools.count()


class ThreadHop:
    """Long-lived worker threads fed by one queue (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple, trio.lowlevel.TrioToken,
                                            trio.lowlevel.Task]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job (or about to)
        self.threads = 0  # started so far (never more than jobs at once)

    @property
    def busy(self) -> int:
        """Jobs handed over and not finished (queued or running)."""
        return self.threads - self._idle

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; its result, or what it raised."""
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._lock:
            start = not self._idle
            if start:
                self.threads += 1
            else:
                self._idle -= 1
        if start:
            threading.Thread(
                target=self._work, name=f"{self.name} {next(_names)}", daemon=True
            ).start()
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(),
                        trio.lowlevel.current_task()))

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # a started job ends first (see the module)

        return await trio.lowlevel.wait_task_rescheduled(abort)  # the outcome, unwrapped

    def _work(self) -> None:
        while True:
            fn, args, token, task = self._jobs.get()
            result = outcome.capture(fn, *args)
            del fn, args  # do not hold the job's arguments while waiting for the next
            with self._lock:
                self._idle += 1
            with contextlib.suppress(trio.RunFinishedError):  # the caller's run ended
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            del token, task, result


#: Opening and parsing rebuilt blocks (blocks/remote.py), bounded by the block limiter.
BLOCK_HOPS = ThreadHop("fluidfs block")
