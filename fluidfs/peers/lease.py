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
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from fluidfs.peers.rootrecord import RecordClient

log = logging.getLogger(__name__)

DEFAULT_RENEW = 15.0
TTL_FACTOR = 4  # a lease lives for this many renewal intervals


class LeaseHeld(Exception):
    """Another machine holds the writer lease."""


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
    def of(cls, seq: int, body: dict) -> LeaseInfo:
        def get(key, kind, default):
            value = body.get(key, default)
            return value if isinstance(value, kind) else default

        return cls(
            seq,
            get("machine", bytes, b""),
            get("host", str, "?"),
            get("mount", str, "?"),
            get("pid", int, 0),
            float(get("time", int, 0)) / 1e9,
            float(get("ttl", int, 0)),
            get("state", str, "released"),
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
        self.lost: LeaseInfo | None = None  # who took it over
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
        """The newest lease on the reachable peers (None if none answered or none exists)."""
        found = await self.client.newest("lease")
        if found is None or not found.exists:
            return None
        return LeaseInfo.of(found.seq, found.body)

    async def acquire(self, *, takeover: bool) -> LeaseInfo | None:
        """Take the lease (refusing if another live mount holds it); return the one replaced."""
        held = await self.current()
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
        """Renew the lease; False (and ``lost`` set) if another machine has taken it."""
        if self.lost is not None:
            return False
        held = await self.current()
        if held is not None and held.machine != self.machine and held.seq > self.seq:
            self.lost = held
            log.error("the writer lease was taken over by %s: this mount stops writing",
                      held.where())
            return False
        self.seq = max(self.seq, held.seq if held is not None else 0) + 1
        self.published = await self.client.publish("lease", self.seq, self._body("held"))
        return True

    async def release(self) -> None:
        """Give the lease up (clean unmount)."""
        if self.lost is not None or not self.seq:
            return
        self.seq += 1
        await self.client.publish("lease", self.seq, self._body("released"))
