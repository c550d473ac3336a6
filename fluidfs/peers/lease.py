"""The writer lease: one mount per keyfile at a time.

The mount that writes the tree holds a *lease*: a ``lease`` record (see
rootrecord.py) naming its machine (a random id per state directory), host, mount
point and pid, renewed every ``renew`` seconds with a higher sequence number and
valid for ``ttl`` seconds after its last renewal. A clean unmount publishes it as
released.

- A mount finds the newest lease on the peers it can reach. If another machine
  holds it and it has not expired, the mount is refused with a message saying where
  the tree is mounted — unless ``--takeover`` was given, in which case the new mount
  publishes its own lease with a higher sequence number.
- At every renewal the holder looks first: a newer lease of another machine means
  it was taken over, and the old mount stops writing (it turns read-only and makes
  no more commits). It also looks before publishing each root record.

This is a lease, not consensus: two machines that cannot reach the same peers can
both believe they hold it. Times are the writers' clocks.

A lease is read strictly (``LEASE_BODY``): a missing or mistyped field makes it
unreadable, never a default — a default once made an unreadable lease look released.
An unreadable newest lease refuses the mount unless ``--takeover`` is given, and stops
a holder that finds it newer than its own. Unknown keys are ignored, so that a later
version may add some.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fluidfs.peers.rootrecord import RecordClient
from fluidfs.wire import IGNORE, Bytes, Int, Map, OneOf, SchemaError, Str, validate

log = logging.getLogger(__name__)

DEFAULT_RENEW = 15.0
TTL_FACTOR = 4  # a lease lives for this many renewal intervals


class LeaseHeld(Exception):
    """Another machine holds the writer lease (or its lease cannot be read)."""


class LeaseUnreadable(Exception):
    """The newest lease verifies as ours but its body does not fit ``LEASE_BODY``."""

    def __init__(self, seq: int, why: str) -> None:
        super().__init__(f"the newest writer lease (seq {seq}) cannot be read: {why}")
        self.seq = seq


U64 = Int(0, 2**64 - 1)

#: The decrypted body of a ``lease`` record (``kind`` and ``seq`` are checked against
#: the record's header by rootrecord.open_record).
LEASE_BODY = Map(
    {
        "kind": OneOf("lease"),
        "seq": U64,
        "time": U64,  # ns
        "machine": Bytes(1, 64),
        "host": Str(1024),
        "mount": Str(4096),
        "pid": U64,
        "addr": Str(300),
        "ttl": U64,  # seconds
        "state": OneOf("held", "released"),
    },
    extra=IGNORE,
)


@dataclass
class LeaseInfo:
    """A lease as found on the peers."""

    seq: int
    machine: bytes
    host: str
    mount: str
    pid: int
    time: float
    ttl: float
    state: str

    @classmethod
    def of(cls, seq: int, body: dict[str, Any]) -> LeaseInfo:
        """The lease in a record's decrypted *body*; ``SchemaError`` unless every field
        is there with its type."""
        b = validate(LEASE_BODY, body, "lease")
        return cls(
            seq, b["machine"], b["host"], b["mount"], b["pid"], b["time"] / 1e9,
            float(b["ttl"]), b["state"],
        )

    def live(self, now: float | None = None) -> bool:
        """Held and not expired."""
        now = time.time() if now is None else now
        return self.state == "held" and now < self.time + self.ttl

    def where(self) -> str:
        """Where the lease holder is mounted, for messages."""
        return f"host {self.host} at {self.mount} (pid {self.pid})"


class WriterLease:
    """This mount's side of the lease."""

    def __init__(
        self,
        client: RecordClient,
        machine: bytes,
        mount: str,
        *,
        renew: float = DEFAULT_RENEW,
        addr_of: Callable[[], str] = lambda: "",
    ) -> None:
        self.client = client
        self.machine = machine
        self.mount = mount
        self.renew = renew
        self.ttl = renew * TTL_FACTOR
        self.addr_of = addr_of
        self.seq = 0
        self.taken = False  # another mount took the lease over: we stopped writing
        self.lost: LeaseInfo | None = None  # who took it over (None if unreadable)
        self.published = 0  # peers that stored our latest lease

    def _body(self, state: str) -> dict:
        return {
            "time": time.time_ns(),
            "machine": self.machine,
            "host": socket.gethostname(),
            "mount": self.mount,
            "pid": os.getpid(),
            "addr": self.addr_of(),
            "ttl": int(self.ttl),
            "state": state,
        }

    async def current(self) -> LeaseInfo | None:
        """The newest lease on the reachable peers (None if none answered or none exists);
        ``LeaseUnreadable`` if it does not fit the lease schema."""
        found = await self.client.newest("lease")
        if found is None or not found.exists:
            return None
        try:
            return LeaseInfo.of(found.seq, found.body)
        except SchemaError as exc:
            raise LeaseUnreadable(found.seq, str(exc)) from None

    async def acquire(self, *, takeover: bool) -> LeaseInfo | None:
        """Take the lease (refusing if another live mount holds it); return the one replaced."""
        try:
            held = await self.current()
        except LeaseUnreadable as exc:
            if not takeover:
                raise LeaseHeld(f"{exc}; mount with --takeover to replace it") from None
            log.warning("replacing an unreadable writer lease: %s", exc)
            self.seq = exc.seq + 1
            self.published = await self.client.publish("lease", self.seq, self._body("held"))
            return None
        if held is not None and held.machine != self.machine and held.live() and not takeover:
            ago = max(0, int(time.time() - held.time))
            raise LeaseHeld(
                f"this keyfile is mounted on {held.where()}, lease renewed {ago} s ago; "
                "unmount it there, wait for its lease to expire "
                f"({int(held.ttl)} s after its last renewal), or mount with --takeover"
            )
        self.seq = (held.seq if held is not None else 0) + 1
        self.published = await self.client.publish("lease", self.seq, self._body("held"))
        if held is not None and held.machine != self.machine and held.live():
            log.warning("took over the writer lease from %s", held.where())
        return held

    async def check(self) -> bool:
        """Renew the lease; False (``taken``, and ``lost`` set if it can be read) if another
        machine has taken it."""
        if self.taken:
            return False
        try:
            held = await self.current()
        except LeaseUnreadable as exc:
            if exc.seq > self.seq:
                self.taken = True
                log.error("%s: newer than ours, so this mount stops writing", exc)
                return False
            held = None  # an old one: ours replaces it
        if held is not None and held.machine != self.machine and held.seq > self.seq:
            self.taken, self.lost = True, held
            log.error("the writer lease was taken over by %s: this mount stops writing",
                      held.where())
            return False
        self.seq = max(self.seq, held.seq if held is not None else 0) + 1
        self.published = await self.client.publish("lease", self.seq, self._body("held"))
        return True

    async def release(self) -> None:
        """Give the lease up (clean unmount)."""
        if self.taken or not self.seq:
            return
        self.seq += 1
        await self.client.publish("lease", self.seq, self._body("released"))
