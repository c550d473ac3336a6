"""Holding the writer lease while mounted: take it, renew it, hand it over, give it back.

The lease itself (its record, the quorum, the fence) is peers/lease.py. This is the
mount's side over time: renewals every ``renew`` seconds; writes acknowledged only while
the lease is fresh (``may_write``); and what the end of it means. When another mount
asks for a handover, this mount stops acknowledging writes (``on_lost``), commits what
it acknowledged (the commit loop, remount/commits.py, calls ``hand_over`` after its last
commit) and releases the lease to it. When the lease was taken (a later fence), it stops
writing and says who took it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from fluidfs.peers.lease import LeaseInfo, Look, Renewal, WriterLease

log = logging.getLogger(__name__)

RELEASE_WAIT = 10.0


class LeaseKeeper:
    """Whether this mount may write, kept true by renewing the lease."""

    def __init__(self, lease: WriterLease, *, on_lost: Callable[[], None]) -> None:
        self.lease = lease
        self.on_lost = on_lost  # writes must stop now (read-only), and the commit loop wake
        self.writer = True
        self.held = False  # the lease was taken: writes now wait on its freshness
        self.stepping_down = False  # asked to hand over: last commit, then release
        self.stopping = False
        self.released = False
        self._lock = trio.Lock()  # a renewal never overtakes the release

    @property
    def lost_to(self) -> LeaseInfo | None:
        """The lease that replaced ours (or asked us to hand over), once lost."""
        return self.lease.lost or self.lease.asked_by

    @property
    def lost_reason(self) -> str:
        """Why this mount no longer writes ("" while it does)."""
        if self.writer:
            return ""
        if self.stepping_down or self.lease.asked_by is not None:
            asker = self.lease.asked_by
            who = asker.by_host if asker is not None and asker.by_host else "another mount"
            return f"handed over to {who}"
        holder = self.lease.lost
        return "taken over by " + (holder.where() if holder else "another mount")

    def may_write(self) -> bool:
        """True while writes may be acknowledged: the writer, with a fresh lease (a
        mount that never took one, having no peers, is the writer as long as it has none)."""
        if not self.held:
            return self.writer
        return self.writer and self.lease.fresh()

    @property
    def may_commit(self) -> bool:
        """Commits may still be made: the writer, or handing over its last one."""
        return self.writer or self.stepping_down

    async def acquire(
        self,
        *,
        takeover: bool,
        on_wait: Callable[[float, LeaseInfo | None], None] = lambda left, holder: None,
        seen: Look | None = None,
    ) -> None:
        """Take the lease (from *seen*, a look just made, if given; see
        ``WriterLease.acquire``); raises peers.lease.LeaseHeld if another live mount
        holds it."""
        await self.lease.acquire(takeover=takeover, on_wait=on_wait, seen=seen)
        self.held = True

    async def check(self) -> bool:
        """Renew the lease now; False (and writing stopped) once another mount takes it
        or asks for it."""
        async with self._lock:
            if not self.writer or self.released:
                return False
            if not self.held:
                return True  # no lease taken (no peers at mount): nothing to renew
            outcome = await self.lease.renew_now()
            if outcome is Renewal.TAKEN:
                self._lost()
                return False
            if outcome is Renewal.HANDOVER:
                log.warning("%s asks for the writer lease: committing, then handing over",
                            self.lease.asked_by.by_host if self.lease.asked_by else "a mount")
                self.stepping_down = True
                self._lost()
                return False
            return True

    async def before_publish(self) -> bool:
        """May a root record go out now? Not once the lease was taken (the fence would
        make peers refuse it anyway); a handover's last commit may. Renews first unless
        a renewal that reached a majority started within the last interval."""
        if self.stepping_down:
            return not self.lease.fenced()
        if self.lease.fenced():
            self._lost()
            return False
        if self.writer and not self.released and self.held and self.lease.renewed_within(
            self.lease.renew
        ):
            # A renewal reached a majority less than one interval ago: no other mount can
            # have taken the lease since (a taker waits bound + margin, over three
            # intervals, after its request reached a majority, and our renewal started
            # before that), so publishing now is as safe as a write acknowledged now. A
            # small sync is spared a quorum round trip (docs/decisions.md, issue 16).
            return True
        return await self.check() or self.stepping_down

    def _lost(self) -> None:
        self.writer = False
        self.on_lost()

    async def hand_over(self) -> None:
        """After the last commit: release the lease to the mount that asked."""
        async with self._lock:
            if self.released:
                return
            self.released = True
            stored = await self.lease.release()
            self.stepping_down = False
            log.warning("handed the writer lease over (%d holders stored the release)", stored)

    async def run(self) -> None:
        """Renew every ``renew`` seconds until the lease is lost or the mount stops."""
        while self.writer:
            # Renewals start every ``renew`` seconds, however long the last one took.
            started = trio.current_time()
            if self.stopping:
                return
            if self.held:
                await self.check()
            await trio.sleep_until(started + self.lease.renew)

    def stop(self) -> None:
        """Unmounting: renew no more (the lease stays ours until released)."""
        self.stopping = True

    async def release(self) -> None:
        """Stop renewing and give the lease back (bounded: peers may be gone)."""
        self.stop()
        with trio.move_on_after(RELEASE_WAIT):
            async with self._lock:
                if self.released or not self.writer:
                    return
                self.released = True
                await self.lease.release()
