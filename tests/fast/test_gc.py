"""Garbage collection (blocks/gc.py): shards nobody references are deleted from wherever
they are held, holder by holder in bounded batches; a holder that cannot be reached
keeps its entries until a later round; nothing is forgotten before it is deleted.

The owner and its hosts are real peer services in this process on 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from inproc import LocalStore, PeerNode, peer_nodes, slow_jump_clock

from fluidfs import keys
from fluidfs.blocks import gc
from fluidfs.blocks.codec import BlockCodec
from fluidfs.blocks.gc import Collector
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.blocks.remote import RemoteShards

K, N = 2, 4


def held(host: PeerNode, owner: PeerNode) -> set[bytes]:
    return set(host.shards.ids(owner.key))


async def test_collect_deletes_everywhere_and_retries_the_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gc, "BATCH", 3)  # several batches per holder
    ring = keys.KeyRing(keys.generate(shards_total=N, shards_needed=K))
    async with peer_nodes(tmp_path, N) as (nursery, hosts):
        owner = await PeerNode(tmp_path / "owner", ring).start(nursery, listen=False)
        try:
            for host in hosts:
                owner.use(host)
            codec = BlockCodec(dedup_key=ring.dedup_key, wrap_key=ring.wrap_key,
                               needed=K, total=N)
            limiter = trio.CapacityLimiter(2)
            remote = RemoteShards(owner.conns, owner.peers, owner.ledger, codec, limiter)
            collector = Collector(owner.db, owner.shards, owner.key, limiter)
            collector.remote_delete = remote.delete_ids
            dead: list[StoredBlock] = []
            for _ in range(4):
                data = os.urandom(20_000)
                record, shards = codec.seal(data, codec.block_id(data))
                holders = [NO_HOLDER] * N
                await remote.place(record, shards, holders)
                assert NO_HOLDER not in holders
                dead.append(StoredBlock(record, 0, holders))
            # Four local shards too (kept here before the node had peers).
            local = [os.urandom(32) for _ in range(4)]
            owner.shards.put_many(owner.key, [(sid, b"x" * 100) for sid in local])
            # One holder that cannot be reached (nothing listens there).
            gone = owner.peers.add(os.urandom(32), "127.0.0.1:1").index
            with owner.db.write() as txn:
                for stored in dead:
                    collector.enqueue(txn, stored)
                for sid in local:
                    collector.enqueue_one(txn, LOCAL_HOLDER, sid, 100)
                collector.enqueue_one(txn, gone, b"s" * 32, 5000)
            shard_size = dead[0].record.shard_size
            assert collector.pending() == (4 * N + 5, 4 * N * shard_size + 400 + 5000)

            assert await collector.collect(local_only=True) == 4
            assert owner.shards.used(owner.key) == 0
            assert collector.pending()[0] == 4 * N + 1, "peers' copies wait for the collector"
            assert all(len(held(host, owner)) == N for host in hosts)

            assert await collector.collect() == 4 * N
            assert all(not held(host, owner) for host in hosts)
            assert all(owner.ledger.get(h.key).they_use == 0 for h in hosts), "space given back"
            assert collector.pending() == (1, 5000), "the unreachable holder's entry stays"
            assert await collector.collect() == 0
            assert collector.pending() == (1, 5000)
        finally:
            owner.close()


def test_the_collector_runs_every_interval_and_at_once_when_woken(tmp_path: Path) -> None:
    ring = keys.KeyRing(keys.generate())

    async def main() -> None:
        store = LocalStore(tmp_path / "state", ring)
        collector = store.blocks.collector
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collector.run)
                await trio.sleep(1)
                store.shards.put_many(ring.public_key, [(b"a" * 32, b"x"), (b"b" * 32, b"y")])
                with store.db.write() as txn:
                    collector.enqueue_one(txn, LOCAL_HOLDER, b"a" * 32, 1)
                await trio.sleep(gc.GC_INTERVAL - 2)
                assert collector.pending() == (1, 1), "not before the interval"
                await trio.sleep(2)
                assert collector.pending() == (0, 0), "collected at the interval"
                with store.db.write() as txn:
                    collector.enqueue_one(txn, LOCAL_HOLDER, b"b" * 32, 1)
                collector.wake()
                await trio.sleep(0.5)
                assert collector.pending() == (0, 0), "collected as soon as woken"
                assert store.shards.used(ring.public_key) == 0
                nursery.cancel_scope.cancel()
        finally:
            store.close()

    trio.run(main, clock=slow_jump_clock())


async def _owner_with_journal(tmp_path: Path, nursery, hosts, ring):
    """An owner using every host, its RemoteShards journalling into its Collector."""
    owner = await PeerNode(tmp_path / "owner", ring).start(nursery, listen=False)
    for host in hosts:
        owner.use(host)
    codec = BlockCodec(dedup_key=ring.dedup_key, wrap_key=ring.wrap_key, needed=K, total=N)
    limiter = trio.CapacityLimiter(2)
    remote = RemoteShards(owner.conns, owner.peers, owner.ledger, codec, limiter)
    collector = Collector(owner.db, owner.shards, owner.key, limiter)
    collector.remote_delete = remote.delete_ids
    remote.journal = collector
    return owner, codec, remote, collector


def _host_of(hosts: list[PeerNode], owner: PeerNode, holder: int) -> PeerNode:
    return next(h for h in hosts if owner.peers.get(h.key).index == holder)


async def _placed_block(
    codec: BlockCodec, remote: RemoteShards
) -> tuple[Any, list[Any], list[int]]:
    """A small block sealed and placed with the peers: its record, shards and holders."""
    data = os.urandom(20_000)
    record, shards = codec.seal(data, codec.block_id(data))
    holders = [NO_HOLDER] * N
    await remote.place(record, shards, holders)
    return record, shards, holders


async def test_a_shard_stored_again_where_its_lost_store_went_is_not_collected(
    tmp_path: Path,
) -> None:
    """A store whose answer was lost queues the shard for deletion on that holder; the
    same shard stored there again (a repair after a cut line) is in the placing journal
    until its record names the holder. Before: the collector deleted it meanwhile, and
    the record named a holder without its shard (one shard short in the link-cut lab)."""
    ring = keys.KeyRing(keys.generate(shards_total=N, shards_needed=K))
    async with peer_nodes(tmp_path, N) as (nursery, hosts):
        owner, codec, remote, collector = await _owner_with_journal(tmp_path, nursery, hosts,
                                                                    ring)
        try:
            record, _, holders = await _placed_block(codec, remote)
            sid, holder = record.shard_ids[0], holders[0]
            host = _host_of(hosts, owner, holder)
            # The first store's answer never came: queued for deletion, uncounted.
            collector.unanswered(holder, sid, record.shard_size)
            assert sid in held(host, owner)
            with owner.db.write() as txn:  # the retry's journal entry (place wrote it)
                txn.put(gc._key(holder, sid), gc._SIZE.pack(record.shard_size)
                        + record.block_id + gc.STORED, db=collector._placing)

            await collector.collect()
            assert sid in held(host, owner), "the copy being recorded was deleted"

            with owner.db.write() as txn:  # the record names the holder
                collector.reclaim(txn, holder, sid)
                collector.placed(txn, holders, record.shard_ids)
            await collector.collect()
            assert sid in held(host, owner)
            assert collector.pending() == (0, 0)
        finally:
            owner.close()


async def test_a_store_waits_for_a_delete_of_the_same_shard_on_its_way(
    tmp_path: Path,
) -> None:
    """A delete already sent when the same shard is stored on that holder again must
    land first: after it, the store puts the shard back. Before: the store overtook
    it and the delete took the shard the record then named."""
    ring = keys.KeyRing(keys.generate(shards_total=N, shards_needed=K))
    async with peer_nodes(tmp_path, N) as (nursery, hosts):
        owner, codec, remote, collector = await _owner_with_journal(tmp_path, nursery, hosts,
                                                                    ring)
        try:
            record, shards, holders = await _placed_block(codec, remote)
            with owner.db.write() as txn:
                collector.placed(txn, holders, record.shard_ids)
            sid, holder = record.shard_ids[0], holders[0]
            host = _host_of(hosts, owner, holder)
            host.shards.delete_many(owner.key, [sid])  # the first store never landed
            collector.unanswered(holder, sid, record.shard_size)

            sending, release = trio.Event(), trio.Event()

            async def held_back_delete(holder: int, ids: list[bytes], size: int) -> bool:
                sending.set()
                await release.wait()
                return await remote.delete_ids(holder, ids, size)

            collector.remote_delete = held_back_delete
            retry = [h if i else NO_HOLDER for i, h in enumerate(holders)]
            async with trio.open_nursery() as inner:
                inner.start_soon(collector.collect)
                await sending.wait()
                # The only peer holding nothing of the block is that holder again.
                inner.start_soon(remote.place, record, shards, retry)
                await trio.testing.wait_all_tasks_blocked(0.2)
                release.set()
            assert retry == holders
            assert sid in held(host, owner), "the delete landed after the store"
        finally:
            owner.close()
