"""Reconciliation: shards a host keeps for us that no record of ours names there go.

Shards can outlive our knowledge of them on a host: an agreement ended (we forgot the
holder and repaired elsewhere) and a new one began with the same peer before its keep
period dropped them, or a delete never reached it. Each cycle, for every peer with a live
agreement, the owner pages through ``ListShards`` (the ids the host keeps for us) and
deletes those it does not reference *on that host*.

Which ids are surplus is decided without a race with uploads: the listing comes first;
then the ids journalled as in flight to that host (``placing``) are kept — a shard is
journalled before it is sent and leaves the journal in the same transaction that records
the holder — and only then are the block records scanned (in worker threads, a batch per
read transaction), so a shard stored before the listing is either still journalled or
already recorded when we look. Only the mounted writer runs this (*may_run*): a mount
that lost its lease must not delete what the new writer references.

The host's answers are hostile like any other: pages must be ascending and above the
cursor, and a cycle lists at most ``max_ids`` ids per host. Deleting surplus shards gives
back nothing from our usage figure for the host: it never counted them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from fluidfs.blocks.record import StoredBlock
from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_LIST_PAGE
from fluidfs.peers.connections import PeerUnavailable
from fluidfs.store.db import scan_batch

log = logging.getLogger(__name__)

DELETE_BATCH = 1024  # ids per DeleteShard (its schema's bound)
SCAN_BATCH = 2000  # block records per read transaction


@dataclass
class ReconcilePolicy:
    """How often, and how much one host may make us list in one cycle."""

    interval: float = 24 * 3600.0
    page: int = MAX_LIST_PAGE
    max_ids: int = 1 << 20  # ids listed per host per cycle (a liar cannot page forever)
    timeout: float = 30.0


class Reconciler:
    """Deletes the shards hosts keep for us that our records do not name there."""

    def __init__(
        self, blocks, remote, policy: ReconcilePolicy, may_run: Callable[[], bool]
    ) -> None:
        self.blocks = blocks
        self.remote = remote
        self.policy = policy
        self.may_run = may_run
        self.cycles = 0
        self.deleted = 0  # surplus shards deleted, all cycles

    async def run(self) -> None:
        """Reconcile every interval until cancelled."""
        while True:
            await trio.sleep(self.policy.interval)
            if self.may_run() and self.blocks.remote is not None:
                await self.cycle()

    async def cycle(self) -> int:
        """Reconcile with every live partner at once; return the surplus shards deleted."""
        deleted = 0

        async def one(key: bytes, holder: int) -> None:
            nonlocal deleted
            deleted += await self.reconcile(key, holder)

        async with trio.open_nursery() as nursery:
            for agreement in self.remote.ledger.active():
                peer = self.remote.peers.get(agreement.peer)
                if peer is not None:
                    nursery.start_soon(one, agreement.peer, peer.index)
        self.cycles += 1
        return deleted

    async def reconcile(self, key: bytes, holder: int) -> int:
        """Reconcile with one host; return the surplus shards deleted there."""
        listed = await self._list(key)
        if not listed:
            return 0
        listed -= self.blocks.collector.in_flight(holder)
        surplus = await trio.to_thread.run_sync(
            self._unreferenced, holder, listed, limiter=self.blocks.limiter
        )
        if not self.may_run():
            return 0
        done = 0
        ids = sorted(surplus)
        for start in range(0, len(ids), DELETE_BATCH):
            chunk = ids[start : start + DELETE_BATCH]
            if not await self.remote.delete_ids(holder, chunk, 0):
                break
            done += len(chunk)
        if done:
            log.info("peer %s kept %d shards of ours that we no longer reference: deleted",
                     encode_peer_id(key)[:12], done)
        self.deleted += done
        return done

    async def _list(self, key: bytes) -> set[bytes]:
        """Every id the host lists for us (at most max_ids); empty if it does not answer."""
        found: set[bytes] = set()
        after = b""
        while len(found) < self.policy.max_ids:
            try:
                reply = await self.remote.conns.call(
                    key, "ListShards", {"after": after, "limit": self.policy.page},
                    timeout=self.policy.timeout,
                )
            except (PeerUnavailable, RpcError) as exc:
                log.info("listing our shards on %s failed: %s", encode_peer_id(key)[:12], exc)
                return set()  # judge nothing on half a listing: next cycle
            ids = reply["ids"]
            if any(b <= a for a, b in zip([after, *ids], ids, strict=False)):
                log.warning("peer %s listed shards out of order: reconciling later",
                            encode_peer_id(key)[:12])
                return set()
            found.update(ids)
            if not reply["more"] or not ids:
                break
            after = ids[-1]
        return found

    def _unreferenced(self, holder: int, listed: set[bytes]) -> set[bytes]:
        """Those of *listed* that no block record names on *holder* (worker thread)."""
        left = set(listed)
        after: bytes | None = b""
        table = self.blocks.meta["blocks"]
        while after is not None and left:
            with self.blocks.meta.read() as txn:
                records, after = scan_batch(txn, table, after, SCAN_BATCH)
            for key, raw in records:
                stored = StoredBlock.decode(key, raw)
                for shard_id, h in zip(stored.record.shard_ids, stored.holders, strict=True):
                    if h == holder:
                        left.discard(shard_id)
        return left
