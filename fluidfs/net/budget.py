"""Memory held for peers, counted at three levels: connection, strangers, node.

Every byte the RPC layer holds because of a peer (a frame being received, a decoded
request while its handler runs, a reply until it is sent) is a ``Hold`` taken from that
connection's ``ConnBudget``. A hold must fit at every level at once:

* the connection: ``partner_conn_bytes`` while the peer has an active agreement,
  ``stranger_conn_bytes`` otherwise (asked again at every reservation, so a stranger that
  makes an agreement gets the larger share from its next frame on);
* strangers together: ``stranger_bytes`` (partners do not draw on it, so strangers can
  never take the room partners need);
* the node: ``node_bytes``, shared by every connection (``NodeBudget``).

Strangers are also held to a message rate (``RateBucket``), per connection and for all of
them together: the reader of a stranger's connection waits for its turn before it reads
the next frame, so a stranger flooding cheap requests is slowed by TCP back-pressure
instead of costing the node CPU for each one. Partners are not rate-limited.

Reserving waits (the RPC reader stops reading, so the peer is slowed by TCP back-pressure)
until the hold fits. Only connection readers reserve, one at a time per connection, and
holds are released by tasks that never wait for a reader (handlers finishing, replies sent
or abandoned after ``send_timeout``), so waiting cannot deadlock. A single hold larger than
its connection's share is clamped to the share: the peer then gets that one message at a
time.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .limits import DEFAULT_LIMITS, NetLimits

__all__ = ["ConnBudget", "Hold", "NodeBudget", "RateBucket"]


class RateBucket:
    """A token bucket whose takers queue in virtual time: ``take()`` spends one token now
    and returns how long the taker must wait for it (0 while tokens are left). The bucket
    may go into debt by one token per waiting taker, so waits are first come, first served
    and a waiter never needs waking."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._at: float | None = None  # made outside trio.run: the clock starts at first use

    def take(self) -> float:
        """Spend one token; seconds to wait before using it."""
        now = trio.current_time()
        if self._at is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate)
        self._at = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class NodeBudget:
    """The node-wide pools (all connections, and strangers' share of them)."""

    def __init__(self, limits: NetLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.free = limits.node_bytes
        self.stranger_free = limits.stranger_bytes
        self.stranger_msgs = RateBucket(limits.stranger_msg_rate, limits.stranger_msg_burst)
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def held(self) -> int:
        """Bytes held for all peers now."""
        return self.limits.node_bytes - self.free

    def connection(self, is_partner: Callable[[], bool]) -> ConnBudget:
        """A budget for one connection; ``is_partner()`` says which share applies now."""
        return ConnBudget(self, is_partner)

    def _take(self, n: int, stranger: bool) -> None:
        self.free -= n
        if stranger:
            self.stranger_free -= n

    def _give(self, n: int, stranger: bool) -> None:
        self.free += n
        if stranger:
            self.stranger_free += n
        if self._lot:  # waiters only while a pool is exhausted
            self._lot.unpark_all()


class ConnBudget:
    """The bytes one connection may hold; see the module docstring."""

    def __init__(self, node: NodeBudget, is_partner: Callable[[], bool]) -> None:
        self.node = node
        self.is_partner = is_partner
        self.held = 0
        self._lot = trio.lowlevel.ParkingLot()  # waiting for this connection's own holds
        limits = node.limits
        self._msgs = RateBucket(limits.stranger_conn_msg_rate, limits.stranger_conn_msg_burst)

    async def pace(self) -> None:
        """Wait for a stranger's turn to send one more message (partners never wait)."""
        if self.is_partner():
            return
        wait = self._msgs.take()
        if wait:
            await trio.sleep(wait)
        wait = self.node.stranger_msgs.take()
        if wait:
            await trio.sleep(wait)

    def share(self) -> int:
        """What this connection may hold now (depends on whether the peer is a partner)."""
        limits = self.node.limits
        return limits.partner_conn_bytes if self.is_partner() else limits.stranger_conn_bytes

    def try_reserve(self, n: int, alongside: Hold | None = None) -> Hold | None:
        """The hold ``reserve`` would give, if it fits now (None otherwise)."""
        hold = self._try(n, alongside)
        return hold if isinstance(hold, Hold) else None

    def _try(self, n: int, alongside: Hold | None) -> Hold | trio.lowlevel.ParkingLot:
        """The hold, or the parking lot to wait in: this connection's if its own share is
        full (only its own releases can help), the node's if a pool is."""
        node = self.node
        limits = node.limits
        stranger = not self.is_partner()
        share = limits.stranger_conn_bytes if stranger else limits.partner_conn_bytes
        want = max(0, min(n, share - (alongside.amount if alongside else 0)))
        if self.held + want > share:
            return self._lot
        if node.free < want or (stranger and node.stranger_free < want):
            return node._lot
        node._take(want, stranger)
        self.held += want
        return Hold(self, want, stranger)

    async def reserve(self, n: int, alongside: Hold | None = None) -> Hold:
        """Wait until ``n`` bytes fit; return the hold.

        ``n`` is clamped to the connection's share, less ``alongside`` (a hold that will be
        kept together with this one), so that a single message never waits for room the
        connection can never have.
        """
        while not isinstance(hold := self._try(n, alongside), Hold):
            await hold.park()
        return hold

    def _release(self, n: int, stranger: bool) -> None:
        self.held -= n
        self._lot.unpark_all()
        self.node._give(n, stranger)


class Hold:
    """Bytes reserved for one thing a peer made us hold; release exactly once (idempotent)."""

    __slots__ = ("amount", "budget", "stranger")

    def __init__(self, budget: ConnBudget, amount: int, stranger: bool) -> None:
        self.budget = budget
        self.amount = amount
        self.stranger = stranger

    def shrink(self, n: int) -> None:
        """Keep at most ``n`` bytes of the hold, giving back the rest now."""
        if n < self.amount:
            self.budget._release(self.amount - n, self.stranger)
            self.amount = n

    def overdraw(self, n: int) -> None:
        """Add ``n`` bytes at once, even past the limits (only for replies of ops that have
        no response schema, whose size could not be reserved ahead: never a v1 op)."""
        self.budget.held += n
        self.budget.node._take(n, self.stranger)
        self.amount += n

    def release(self) -> None:
        """Give the whole hold back."""
        self.shrink(0)
