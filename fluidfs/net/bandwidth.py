"""Bandwidth limits for all peer traffic: one token bucket per direction, with priorities.

A node has one ``Bandwidth``: ``up`` for every byte it sends to peers, ``down`` for
every byte it reads from them (``fluidfs mount/serve --limit-upload/--limit-download``).
The secure channel (``net/channel.py``) moves frames through them in chunks of at most
``chunk`` bytes: before sending a chunk it waits for its turn in ``up``; after reading
one it pays for it in ``down`` (the next read waits, the kernel's receive window fills
and TCP slows the sender). Without a limit a direction only counts bytes, which
``fluidfs status`` turns into rates.

Rates are bytes per second. The bucket holds at most ``burst`` bytes of credit and may go
into debt by one chunk: a chunk is let through whenever the credit is not negative. So
over any window of W seconds at most ``burst + chunk + rate * W`` bytes pass; both are
small fractions of a second's worth (``BURST_SECONDS``, ``CHUNK_SECONDS``), which keeps
every 5-second window within 5% of the limit. What counts is what the link carries:
frame lengths, tags and MACs, and the headers of the TCP segments they travel in
(``on_wire``: Ethernet, IPv4 and TCP with timestamps, 66 bytes per segment of at most
1448), so a router counting its uplink sees the limit — without them it saw 4.6% more.

Priorities (``up`` only; lower numbers go first; equal ones first come, first served):
``SERVE`` for answers to peers — retrievals, audits — and for the node's own small
calls, then ``repair_priority(live)`` for repair (blocks with fewer live shards first),
then ``UPLOAD`` for new data. A waiting sender of higher priority always goes before a
lower one, so a full upload queue cannot delay a peer's retrieval by more than the chunk
on the wire.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

__all__ = [
    "REPAIR",
    "SERVE",
    "UPLOAD",
    "Bandwidth",
    "Deadline",
    "TokenBucket",
    "on_wire",
    "repair_priority",
]

SERVE = 0  # answering peers (retrievals, audits) and our own small calls
REPAIR = 1 << 16  # + live shards of the block: the most endangered first
UPLOAD = 1 << 20  # new data
MAX_CHUNK = 64 << 10  # bytes moved per wait at most
MIN_CHUNK = 4 << 10
CHUNK_SECONDS = 0.02  # a chunk is at most this long at the limit (above MIN_CHUNK)
BURST_SECONDS = 0.05  # credit the bucket may save up, in seconds at the limit
SEGMENT = 1448  # TCP payload per segment: a 1500-byte MTU less IPv4, TCP and timestamps
HEADERS = 66  # bytes per segment around it: Ethernet 14, IPv4 20, TCP 20, timestamps 12
MIN_WAIT = 1e-4  # seconds: shorter sleeps could leave a float clock where it was


class Deadline:
    """A caller's timeout that stops while its send or receive waits for the node's own
    limit: time in our bandwidth queue is not the peer's time. *read* and *write* get and
    set the moment the timeout counts from (or ends at); while paused it is infinity."""

    def __init__(self, read: Callable[[], float], write: Callable[[float], None]) -> None:
        self._read = read
        self._write = write

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the timeout inside the block; afterwards it is later by the time spent."""
        saved, started = self._read(), trio.current_time()
        self._write(math.inf)
        try:
            yield
        finally:
            self._write(saved + (trio.current_time() - started))


def paused(deadline: Deadline | None) -> contextlib.AbstractContextManager[None]:
    """``deadline.paused()``, or nothing to pause."""
    return contextlib.nullcontext() if deadline is None else deadline.paused()


def on_wire(n: int) -> int:
    """The bytes a link carries for *n* bytes handed to TCP (or read from it) at once:
    they travel in segments of at most ``SEGMENT`` bytes, each with ``HEADERS`` more."""
    return n + -(-n // SEGMENT) * HEADERS


def repair_priority(live: int) -> int:
    """The priority of repairing a block that has *live* shards on peers."""
    return REPAIR + max(0, min(live, REPAIR - 1))


class _Waiter:
    __slots__ = ("key", "wake")

    def __init__(self, priority: int, seq: int) -> None:
        self.key = (priority, seq)
        self.wake = trio.Event()

    def __lt__(self, other: _Waiter) -> bool:
        return self.key < other.key


class TokenBucket:
    """Bytes per second in one direction; ``rate`` None counts without limiting."""

    def __init__(self, rate: float | None = None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("a bandwidth limit must be positive")
        self.rate = rate
        chunk = MAX_CHUNK if rate is None else int(rate * CHUNK_SECONDS)
        self.chunk = max(MIN_CHUNK, min(MAX_CHUNK, chunk))
        self.burst = float(max(self.chunk, int((rate or 0) * BURST_SECONDS)))
        self.tokens = self.burst
        self.total = 0  # bytes that have passed, limited or not
        self._at: float | None = None  # made outside trio.run: the clock starts at first use
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def limited(self) -> bool:
        """True when this direction has a limit (else ``take`` never waits)."""
        return self.rate is not None

    @property
    def waiting(self) -> int:
        """Takers waiting for their turn now."""
        return len(self._queue)

    def count(self, n: int) -> None:
        """Note *n* bytes that passed without waiting (unlimited, or too small to pace)."""
        self.total += n
        if self.rate is not None:
            self._refill()
            self.tokens -= n

    def _refill(self) -> None:
        now = trio.current_time()
        if self._at is not None:
            assert self.rate is not None
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    async def take(self, n: int, priority: int = SERVE) -> float:
        """Wait until *n* bytes may pass, behind every waiter of lower priority number;
        return the seconds waited. Cancelling a wait takes nothing."""
        if self.rate is None:
            await trio.lowlevel.checkpoint()
            self.total += n
            return 0.0
        await trio.lowlevel.checkpoint_if_cancelled()
        started = trio.current_time()
        self._refill()
        if not self._queue and self.tokens > -1.0:
            self.tokens -= n
            self.total += n
            await trio.lowlevel.cancel_shielded_checkpoint()
            return 0.0
        waiter = _Waiter(priority, next(self._seq))
        heapq.heappush(self._queue, waiter)
        try:
            while True:
                if self._queue[0] is waiter:
                    self._refill()
                    if self.tokens > -1.0:  # not in debt (to within a byte: float sums)
                        break
                    with trio.move_on_after(max(-self.tokens / self.rate, MIN_WAIT)):
                        await waiter.wake.wait()
                else:
                    await waiter.wake.wait()
                waiter.wake = trio.Event()
        except BaseException:
            self._leave(waiter)
            raise
        self._leave(waiter)
        self.tokens -= n
        self.total += n
        return trio.current_time() - started

    def _leave(self, waiter: _Waiter) -> None:
        """Take *waiter* out of the queue and let the new head look at the bucket."""
        if self._queue and self._queue[0] is waiter:
            heapq.heappop(self._queue)
        else:
            self._queue.remove(waiter)
            heapq.heapify(self._queue)
        if self._queue:
            self._queue[0].wake.set()


@dataclass
class Bandwidth:
    """A node's two directions (``--limit-upload`` / ``--limit-download``)."""

    up: TokenBucket = field(default_factory=TokenBucket)
    down: TokenBucket = field(default_factory=TokenBucket)

    @classmethod
    def limits(cls, upload: float | None, download: float | None) -> Bandwidth:
        """Buckets for these limits in bytes per second (None: unlimited)."""
        return cls(TokenBucket(upload), TokenBucket(download))
