"""Who may hold a connection to our peer port: caps per address, per identity and in all.

A TCP connection goes through two gates:

1. ``begin(ip)`` when it arrives, before any cryptography. Each address may start
   ``connect_rate_per_ip`` handshakes a second on average (``connect_burst_per_ip`` at
   once; a token bucket). Up to ``connect_queue_per_ip`` more connections wait for their
   turn (the handshake starts late) and beyond that the socket is closed at once. A
   handshake costs the responder ~0.2 ms of key exchange and signatures on the event
   loop, and an attacker dropped for every bad frame dials again: without this, 200
   hostile connections made a node do a thousand handshakes a second. Waiting instead
   of refusing keeps honest peers that share an address with a flood (a NAT, or every
   test on 127.0.0.1) getting in, a little later, as long as they wait their turn. Then
   at most
   ``max_handshakes_per_ip`` handshakes in progress from one address (IPv4 address or
   IPv6 /64) and ``max_handshakes`` in all. When a cap is full the oldest handshake under
   it is dropped, not the newcomer: a flood of silent sockets cannot keep honest peers
   from getting through (to starve them an attacker must open a cap's worth of
   connections per handshake round trip), and one address can only ever drop its own
   handshakes, never those of others. The handshake runs in the ticket's cancel scope,
   ended after ``handshake_timeout``.
2. ``admit(ticket, key, conn)`` once the peer has proven its identity:

   * at most ``max_per_identity`` connections per identity (when full, that identity's
     longest-idle connection is closed: a peer reconnecting after a network change wins
     over its own stale connections; refused if none is idle);
   * peers without an active agreement ("strangers", ``is_partner(key)`` false) are held
     to ``max_strangers_per_ip`` per address and ``max_strangers`` in all; when a cap is
     full, the longest-idle stranger under it (idle at least ``min_idle_to_evict``) is
     closed, otherwise the newcomer is refused;
   * at most ``max_connections`` in all. Strangers can fill at most ``max_strangers`` of
     them, so partners always find room; if full anyway, a partner closes the longest-idle
     stranger (or the oldest stranger, busy or not), a stranger only an idle one.

Partners are exempt from the per-address caps, so peers with agreements on one machine
(or behind one NAT) are never locked out by strangers from the same address. Whether a
peer is a partner is asked again at every decision, so a stranger that makes an agreement
on its connection stops counting as a stranger at once. Our own outgoing connections are
not admitted here (we chose to open them).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import trio

from .limits import DEFAULT_LIMITS, NetLimits

__all__ = ["Admission", "Admitted", "Evictable", "Ticket", "address_group"]

log = logging.getLogger(__name__)

MAX_BUCKETS = 4096  # addresses whose connection rate is remembered before cleanup


def address_group(ip: str) -> str:
    """The unit per-address caps count: an IPv4 address, or an IPv6 /64 (one host's share
    of a typical allocation; anyone with a /64 has 2**64 addresses)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class Evictable(Protocol):
    """What admission needs of an established connection (``RpcConnection`` has it)."""

    @property
    def idle_for(self) -> float | None:
        """Seconds idle, or None while busy."""
        ...

    def close_soon(self, reason: str) -> None:
        """End the connection."""
        ...


class Ticket:
    """One handshake in progress: run it inside ``scope`` (cancelled if it is dropped)."""

    __slots__ = ("delay", "group", "scope")

    def __init__(self, group: str, timeout: float, delay: float = 0.0) -> None:
        self.group = group
        self.delay = delay  # seconds to wait for this address's turn before the handshake
        self.scope = trio.CancelScope(deadline=trio.current_time() + delay + timeout)


class Admitted:
    """One admitted connection; give it back with ``Admission.leave``."""

    __slots__ = ("conn", "group", "key", "since")

    def __init__(self, group: str, key: bytes, conn: Evictable) -> None:
        self.group = group
        self.key = key
        self.conn = conn
        self.since = trio.current_time()


class Admission:
    """The caps of one listening node (see the module docstring)."""

    def __init__(
        self,
        limits: NetLimits = DEFAULT_LIMITS,
        is_partner: Callable[[bytes], bool] = lambda _key: False,
    ) -> None:
        self.limits = limits
        self.is_partner = is_partner
        self._handshakes: dict[Ticket, None] = {}  # insertion order: oldest first
        self._conns: dict[Admitted, None] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # address: (tokens, when)
        self.refused = 0  # connections refused or dropped by a cap, for status and tests

    @property
    def connections(self) -> int:
        """Admitted connections now."""
        return len(self._conns)

    @property
    def handshakes(self) -> int:
        """Handshakes in progress now."""
        return len(self._handshakes)

    # -- gate 1: before the handshake ------------------------------------------------------

    def begin(self, ip: str) -> Ticket | None:
        """A connection from ``ip`` arrived: its handshake ticket, or None to close it."""
        limits = self.limits
        group = address_group(ip)
        delay = self._spend_token(group)
        if delay is None:
            return self._refuse(f"{group} connects too often")
        if len(self._conns) >= limits.max_connections and not self._strangers():
            return self._refuse(f"{limits.max_connections} connections, none evictable")
        local = [t for t in self._handshakes if t.group == group]
        if len(local) >= limits.max_handshakes_per_ip:
            self._drop_handshake(local[0])
        elif len(self._handshakes) >= limits.max_handshakes:
            self._drop_handshake(next(iter(self._handshakes)))
        ticket = Ticket(group, limits.handshake_timeout, delay)
        self._handshakes[ticket] = None
        return ticket

    def _spend_token(self, group: str) -> float | None:
        """Take a token from ``group``'s bucket: the seconds to wait for it (0: now), or
        None if ``connect_queue_per_ip`` connections are waiting already."""
        limits = self.limits
        rate = limits.connect_rate_per_ip
        now = trio.current_time()
        tokens, then = self._buckets.get(group, (float(limits.connect_burst_per_ip), now))
        tokens = min(limits.connect_burst_per_ip, tokens + (now - then) * rate)
        if tokens < 1 - limits.connect_queue_per_ip:
            self._buckets[group] = (tokens, now)
            return None
        tokens -= 1
        self._buckets[group] = (tokens, now)
        if len(self._buckets) > MAX_BUCKETS:  # forget addresses whose bucket is full again
            refill = limits.connect_burst_per_ip / limits.connect_rate_per_ip
            for key in [k for k, (_, t) in self._buckets.items() if now - t > refill]:
                del self._buckets[key]
            if len(self._buckets) > MAX_BUCKETS // 2:  # still many: keep the busiest half
                recent = sorted(self._buckets.items(), key=lambda kv: kv[1][1])
                self._buckets = dict(recent[-(MAX_BUCKETS // 2) :])
        return max(0.0, -tokens / rate)

    def _drop_handshake(self, oldest: Ticket) -> None:
        self.end_handshake(oldest)
        oldest.scope.cancel()
        self.refused += 1
        log.debug("dropping the oldest handshake in progress (from %s): too many", oldest.group)

    def end_handshake(self, ticket: Ticket) -> None:
        """The handshake is over (failed or passed on to ``admit``). Idempotent."""
        self._handshakes.pop(ticket, None)

    # -- gate 2: after the handshake -------------------------------------------------------

    def admit(self, ticket: Ticket, key: bytes, conn: Evictable) -> Admitted | None:
        """``key`` proved its identity: admit ``conn`` (closing others if the caps say so)
        or return None (the caller closes it)."""
        self.end_handshake(ticket)
        limits = self.limits
        group = ticket.group
        same = [a for a in self._conns if a.key == key]
        if len(same) >= limits.max_per_identity and not self._evict_idle(same, 0.0):
            return self._refuse(f"{limits.max_per_identity} connections from one identity")
        partner = self.is_partner(key)
        if not partner:
            local = [a for a in self._strangers() if a.group == group]
            if len(local) >= limits.max_strangers_per_ip and not self._evict_idle(local):
                return self._refuse(f"{limits.max_strangers_per_ip} strangers from {group}")
            strangers = self._strangers()
            if len(strangers) >= limits.max_strangers and not self._evict_idle(strangers):
                return self._refuse(f"{limits.max_strangers} strangers")
        if len(self._conns) >= limits.max_connections:
            strangers = self._strangers()
            if not self._evict_idle(strangers) and not (partner and self._evict_oldest(strangers)):
                return self._refuse(f"{limits.max_connections} connections")
        admitted = Admitted(group, key, conn)
        self._conns[admitted] = None
        return admitted

    def leave(self, admitted: Admitted) -> None:
        """The connection ended. Idempotent."""
        self._conns.pop(admitted, None)

    # -- helpers ---------------------------------------------------------------------------

    def _strangers(self) -> list[Admitted]:
        return [a for a in self._conns if not self.is_partner(a.key)]

    def _evict_idle(self, among: Iterable[Admitted], min_idle: float | None = None) -> bool:
        """Close the longest-idle connection of ``among`` idle at least ``min_idle``."""
        floor = self.limits.min_idle_to_evict if min_idle is None else min_idle
        best, best_idle = None, -1.0
        for a in among:
            idle = a.conn.idle_for
            if idle is not None and idle >= floor and idle > best_idle:
                best, best_idle = a, idle
        if best is None:
            return False
        self._evict(best, f"idle for {best_idle:.1f} s and room was needed")
        return True

    def _evict_oldest(self, among: list[Admitted]) -> bool:
        if not among:
            return False
        self._evict(min(among, key=lambda a: a.since), "room was needed for a partner")
        return True

    def _evict(self, admitted: Admitted, why: str) -> None:
        self.leave(admitted)
        self.refused += 1
        log.debug("closing a connection from %s: %s", admitted.group, why)
        admitted.conn.close_soon(f"closed by the peer: {why}")

    def _refuse(self, why: str) -> None:
        self.refused += 1
        log.debug("refusing a connection: %s", why)
        return None
