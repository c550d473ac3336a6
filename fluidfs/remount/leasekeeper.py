"""Holding the writer lease while mounted: take it, renew it, notice losing it, give it back.

The lease itself (its record, who may take it) is peers/lease.py. This is the mount's
side over time: renewals every ``renew`` seconds, and what losing it means — this
mount stops writing (the FUSE operations turn read-only through ``on_lost``) and says
who took it over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from fluidfs.peers.lease import LeaseInfo, WriterLease

log = logging.getLogger(__name__)

RELEASE_WAIT = 10.0


class LeaseKeeper:
    """Whether this mount may write, kept true by renewing the lease."""

    def __init__(self, lease: WriterLease, *, on_lost: Callable[[], None]) -> None:
        self.lease = lease
        self.on_lost = on_lost
        self.writer = True
        self.stopping = False
        self.released = False
        self._lock = trio.Lock()  # a renewal never overtakes the release

    @property
    def lost_to(self) -> LeaseInfo | None:
        """The lease that replaced ours, once lost."""
        return self.lease.lost

    @property
    def lost_reason(self) -> str:
        """Why this mount no longer writes ("" while it does)."""
        if self.writer:
            return ""
        holder = self.lease.lost
        return "taken over by " + (holder.where() if holder else "another mount")

    async def acquire(self, *, takeover: bool) -> None:
        """Take the lease; raises peers.lease.LeaseHeld if another live mount holds it."""
        await self.lease.acquire(takeover=takeover)

    async def check(self) -> bool:
        """Renew the lease now; False (and writing stopped) if another mount took it."""
        async with self._lock:
            if not self.writer:
                return False
            if self.released:
                return False
            if not await self.lease.check():
                self._lost()
                return False
            return True

    def _lost(self) -> None:
        self.writer = False
        self.on_lost()

    async def run(self) -> None:
        """Renew every ``renew`` seconds until the lease is lost or the mount stops."""
        while self.writer:
            await trio.sleep(self.lease.renew)
            if self.stopping:
                return
            await self.check()

    def stop(self) -> None:
        """Unmounting: renew no more (the lease stays ours until released)."""
        self.stopping = True

    async def release(self) -> None:
        """Stop renewing and give the lease back (bounded: peers may be gone)."""
        self.stop()
        with trio.move_on_after(RELEASE_WAIT):
            async with self._lock:
                if self.released:
                    return
                self.released = True
                await self.lease.release()
