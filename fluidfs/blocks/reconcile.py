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
from fluidfs.store.db import SCAN_BATCH, scan_batch

log = logging.getLogger(__name__)

DELETE_BATCH = 1024  # ids per DeleteShard (its schema's bound)


@dataclass
class ReconcilePolicy:
    """How often, and how much one host may make us list in one cycle."""

    interval: float = 24 * 3600.0
    page: int = MAX_LIST_PAGE
    # ids listed per host per cycle: a liar cannot page forever, and memory stays at
    # ~20 MB a host; judging a partial listing is still sound (surplus is surplus).
    max_ids: int = 1 << 18
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
        """Reconcile with every live partner; return the surplus shards deleted.

        Hosts are listed at once (each with its own timeout), then one scan of the block
        records judges every listing, then each host's surplus is deleted at once.
        """
        hosts: dict[int, bytes] = {}
        for agreement in self.remote.ledger.active():
            peer = self.remote.peers.get(agreement.peer)
            if peer is not None:
                hosts[peer.index] = agreement.peer
        listed: dict[int, set[bytes]] = {}

        async def list_one(holder: int, key: bytes) -> None:
            ids = await self._list(key)
            if ids:
                listed[holder] = ids

        async with trio.open_nursery() as nursery:
            for holder, key in hosts.items():
                nursery.start_soon(list_one, holder, key)
        for holder, ids in listed.items():  # after every listing: see the module doc
            ids -= self.blocks.collector.in_flight(holder)
        surplus = await trio.to_thread.run_sync(
            self._unreferenced, listed, limiter=self.blocks.limiter
        )
        deleted = 0
        if not self.may_run():
            return 0

        async def delete_one(holder: int, ids: set[bytes]) -> None:
            nonlocal deleted
            deleted += await self._delete(hosts[holder], holder, sorted(ids))

        async with trio.open_nursery() as nursery:
            for holder, ids in surplus.items():
                if ids:
                    nursery.start_soon(delete_one, holder, ids)
        self.cycles += 1
        self.deleted += deleted
        return deleted

    async def _delete(self, key: bytes, holder: int, ids: list[bytes]) -> int:
        """Delete surplus *ids* on one host, a DeleteShard batch at a time."""
        done = 0
        for start in range(0, len(ids), DELETE_BATCH):
            chunk = ids[start : start + DELETE_BATCH]
            if not await self.remote.delete_ids(holder, chunk, 0):
                break
            done += len(chunk)
        if done:
            log.info("peer %s kept %d shards of ours that we no longer reference: deleted",
                     encode_peer_id(key)[:12], done)
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

    def _unreferenced(self, listed: dict[int, set[bytes]]) -> dict[int, set[bytes]]:
        """Per holder, those of its listed ids that no block record names on it: one
        scan of the records for every host (worker thread, a batch per transaction)."""
        left = {holder: set(ids) for holder, ids in listed.items()}
        after: bytes | None = b""
        table = self.blocks.meta["blocks"]
        while after is not None and any(left.values()):
            with self.blocks.meta.read() as txn:
                records, after = scan_batch(txn, table, after, SCAN_BATCH)
            for key, raw in records:
                stored = StoredBlock.decode(key, raw)
                for shard_id, holder in zip(stored.record.shard_ids, stored.holders,
                                            strict=True):
                    ids = left.get(holder)
                    if ids:
                        ids.discard(shard_id)
        return left
