"""pyfuse3's session loop without a scheduler turn per request (issue 15, create).

pyfuse3 3.5 reads the kernel's requests in ``_session_loop``: each task takes a
``trio.Lock`` (whose ``acquire`` always yields once, even when nobody holds it), waits
in ``trio.lowlevel.wait_readable`` on ``/dev/fuse`` (which always parks the task until
the next ``epoll_wait`` of trio's run loop, even when requests are already queued),
releases the lock, reads one request and runs its handler. Its two tasks hand the lock
to each other on every request. So each request costs two or three trio scheduler
turns, each an ``epoll_wait`` and a task switch, whether or not the kernel has more
requests ready: with four processes creating small files, most of the mount's CPU.

pyfuse3 looks these up through its module global ``trio`` (which its asyncio mode
replaces the same way), so ``fast_session_loop`` puts a ``FastTrio`` there for the
session's lifetime, which differs from trio in two places only:

- ``Lock`` (pyfuse3's read lock) is taken without yielding when free, and released
  without handing it to a waiter: the task that just read a request takes it again
  when its handler finishes without blocking, while the other reader, woken, finds it
  held and parks again. When a handler blocks (a fetch from peers), the other reader
  takes the lock and serves the kernel, as before.
- ``lowlevel.wait_readable`` first asks ``poll`` with a zero timeout and returns at
  once if a request is already queued; it waits in trio as before when none is, and
  at least every ``YIELD_AFTER_NS`` of such returns, so the rest of the node (the
  write-behind batch's tick, peers, the control socket) and cancellation still get
  their turn while the kernel keeps the session busy.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import pyfuse3
import trio

# The longest the session loop runs requests back to back without a turn of trio's
# scheduler. Short enough that the node's other tasks see no difference (the batch's
# tick is 1 s, peers' deadlines are seconds); long enough that a turn (tens of µs)
# is shared by tens of requests.
YIELD_AFTER_NS = 2_000_000


class ReadLock:
    """A lock that is taken without yielding when free and is not handed over on release:
    whoever asks next while it is free takes it (see the module docstring)."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        """Whether a task holds the lock."""
        return self._held

    async def acquire(self) -> None:
        """Take the lock, parking while another task holds it."""
        while self._held:
            await self._lot.park()
        self._held = True

    def release(self) -> None:
        """Give the lock up and wake one waiter (which takes it only if still free)."""
        self._held = False
        if self._lot:
            self._lot.unpark()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class _Readiness:
    """``wait_readable`` that skips the scheduler while the fd has data (module docstring)."""

    def __init__(self) -> None:
        self._polls: dict[int, Any] = {}
        self._last_turn = time.monotonic_ns()
        self.skipped = 0  # returns without a scheduler turn, for tests and benches
        self.waited = 0  # waits through trio

    def _ready(self, fd: int) -> bool:
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        events = poller.poll(0)
        # POLLERR/POLLHUP/POLLNVAL (an unmounted or closed device) go through trio,
        # which reports them as pyfuse3 expects (readable, or ClosedResourceError).
        return bool(events) and events[0][1] == select.POLLIN

    async def wait_readable(self, fd: int) -> None:
        """Return once *fd* is readable; without a scheduler turn if it already is and
        the last turn was under ``YIELD_AFTER_NS`` ago."""
        now = time.monotonic_ns()
        if now - self._last_turn < YIELD_AFTER_NS and self._ready(fd):
            self.skipped += 1
            return
        self.waited += 1
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            self._last_turn = time.monotonic_ns()


class _FastLowlevel:
    """``trio.lowlevel`` with ``_Readiness.wait_readable`` in place of its own."""

    def __init__(self, readiness: _Readiness) -> None:
        self.wait_readable = readiness.wait_readable

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


class TurnCounter(trio.abc.Instrument):
    """Counts the turns of trio's run loop (each one ``epoll_wait``)."""

    def __init__(self) -> None:
        self.turns = 0

    def before_io_wait(self, timeout: float) -> None:
        """Called by trio once a turn."""
        self.turns += 1


class FastTrio:
    """What pyfuse3 sees as ``trio`` during ``fast_session_loop``."""

    Lock = ReadLock

    def __init__(self) -> None:
        self.readiness = _Readiness()
        self.lowlevel = _FastLowlevel(self.readiness)
        self.turns = TurnCounter()

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)

    def figures(self) -> dict[str, int]:
        """The loop's counts for ``fluidfs status --json`` (``fuse_loop``): trio's turns
        since the session opened, reads of /dev/fuse without and after a wait."""
        return {
            "turns": self.turns.turns,
            "reads_without_wait": self.readiness.skipped,
            "reads_after_wait": self.readiness.waited,
        }


@contextmanager
def fast_session_loop(fast: FastTrio | None = None) -> Iterator[FastTrio]:
    """Run pyfuse3's session loop (``pyfuse3.main``) inside with *fast* (a new
    ``FastTrio`` if None) as its trio, counting trio's turns; pyfuse3's own trio is
    restored on exit. (pyfuse3 makes its read lock once a process: a session run
    before this one in the same process leaves it a ``trio.Lock``, which still works.)"""
    fast = FastTrio() if fast is None else fast
    module: Any = pyfuse3
    previous = module.trio
    module.trio = fast
    trio.lowlevel.add_instrument(fast.turns)
    try:
        yield fast
    finally:
        module.trio = previous
        trio.lowlevel.remove_instrument(fast.turns)
