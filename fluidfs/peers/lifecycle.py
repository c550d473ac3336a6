"""Agreement lifecycle: renew while verification passes, end after a long failure.

Following the Fluidbackup paper: peers are expected to be offline now and then,
so an agreement ends only when verification has kept failing for longer than
the tolerance (default one day). Ending is for both directions: our shards on
the peer are counted lost (repair re-creates them elsewhere), the peer is told
with ``EndAgreement`` (retried until it hears it), and what we host for it is
kept for the keep period (default one day, the seed's minimum) and then dropped,
with the records (root pointer, lease) we keep for it. An agreement we ended cannot be
revived by a proposal for the cool-down (default one day, one tolerance period): a peer
that just failed us does not get a fresh start by asking again.

A new agreement that follows an ended one starts clean: shards kept from the old one
were marked unclaimed when it began (service/agreements.py), and those the owner has not
stored, retrieved or audited since are dropped when the old agreement's keep period ends
(``unclaimed_since`` + keep), as they would have been without the new agreement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol

import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import PeerUnavailable
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
NOTIFY_FOR = 7 * DAY  # an ended agreement the peer never heard about is forgotten after this
DROP_BATCH = 1024  # shards deleted per write transaction when dropping an ended partner's


@dataclass
class LifecyclePolicy:
    """Tolerance for failures, how long hosted shards outlive an agreement, and how long
    an agreement we ended stays ended."""

    tolerance: float = DAY
    keep: float = DAY
    tick: float = 60.0
    cooldown: float = DAY


class Caller(Protocol):
    """How the lifecycle reaches a peer (peers/connections.py's ``Connections``)."""

    async def call(
        self, key: bytes, op: str, args: dict[str, Any], *, timeout: float = ...
    ) -> dict[str, Any]:
        """Call *op* on the peer; PeerUnavailable or RpcError if it does not answer."""
        ...


@dataclass
class Lifecycle:
    """Ends agreements whose peers failed too long, and cleans up after ended ones.

    *on_end* is called with the peer's key when we end an agreement (our shards there no
    longer count); *records* are the records we keep for peers, dropped with what we host
    for them. Times are the ledger's clock.
    """

    conns: Caller
    ledger: Ledger
    shards: ShardStore
    limiter: trio.CapacityLimiter
    policy: LifecyclePolicy
    _: KW_ONLY
    on_end: Callable[[bytes], None]
    records: RecordStore | None

    async def run(self) -> None:
        """Check every tick until cancelled."""
        while True:
            await trio.sleep(self.policy.tick)
            await self.tick()

    async def tick(self) -> None:
        """End overdue agreements, tell peers, drop what we hosted past the keep period."""
        now = self.ledger.clock()
        for agreement in self.ledger.active():
            since = agreement.failing_since
            if since is not None and now - since > self.policy.tolerance:
                self.end(agreement.peer, f"failing for {now - since:.0f} s")
            ended = agreement.unclaimed_since
            if agreement.active and ended is not None and now - ended > self.policy.keep:
                await self._drop_unclaimed(agreement.peer)
                agreement.unclaimed_since = None
                self.ledger.save(agreement)
        for agreement in list(self.ledger):
            if agreement.active:
                continue
            age = now - agreement.ended_at
            if not agreement.notified and age < NOTIFY_FOR:
                await self._notify(agreement.peer)
            if age > self.policy.keep:
                await self._drop_hosted(agreement.peer)
                remembered = self.policy.cooldown if agreement.ended_by_us else 0.0
                if age > remembered and (agreement.notified or age >= NOTIFY_FOR):
                    self.ledger.end(agreement.peer)
        await self._drop_orphan_records()

    def end(self, key: bytes, why: str) -> None:
        """End the agreement with *key* now (our decision: it starts the cool-down)."""
        if self.ledger.mark_ended(key, by_us=True) is not None:
            log.warning("ending the agreement with %s: %s", encode_peer_id(key)[:12], why)
            self.on_end(key)

    async def _notify(self, key: bytes) -> None:
        try:
            await self.conns.call(key, "EndAgreement", {}, timeout=10)
        except (PeerUnavailable, RpcError):
            return  # try again next tick
        agreement = self.ledger.get(key)
        if agreement is not None:
            agreement.notified = True
            self.ledger.save(agreement)

    async def _drop_hosted(self, key: bytes) -> None:
        if self.records is not None:
            await trio.to_thread.run_sync(self.records.delete, key, limiter=self.limiter)
        ids = await trio.to_thread.run_sync(
            lambda: list(self.shards.ids(key)), limiter=self.limiter
        )
        freed = 0
        for start in range(0, len(ids), DROP_BATCH):  # bounded write transactions
            freed += await trio.to_thread.run_sync(
                self.shards.delete_many, key, ids[start : start + DROP_BATCH],
                limiter=self.limiter,
            )
        if ids:
            log.info(
                "dropped %d shards (%d bytes) of ended partner %s",
                len(ids),
                freed,
                encode_peer_id(key)[:12],
            )

    async def _drop_unclaimed(self, key: bytes) -> None:
        """Drop the shards kept from an earlier agreement that the owner never re-claimed."""
        count = freed = 0
        more = True
        while more:  # bounded write transactions
            dropped, size, more = await trio.to_thread.run_sync(
                self.shards.drop_unclaimed, key, DROP_BATCH, limiter=self.limiter
            )
            count, freed = count + dropped, freed + size
        if count:
            log.info(
                "dropped %d unclaimed shards (%d bytes) of %s kept from an ended agreement",
                count,
                freed,
                encode_peer_id(key)[:12],
            )

    async def _drop_orphan_records(self) -> None:
        """Records of owners with no agreement at all (kept by older versions) go."""
        if self.records is None:
            return
        owners = await trio.to_thread.run_sync(self.records.owners, limiter=self.limiter)
        for owner in owners:
            if self.ledger.get(owner) is None:
                await trio.to_thread.run_sync(self.records.delete, owner, limiter=self.limiter)
