"""Garbage collection (blocks/gc.py): shards nobody references are deleted from wherever
they are held, holder by holder in bounded batches; a holder that cannot be reached
keeps its entries until a later round; nothing is forgotten before it is deleted.

The owner and its hosts are real peer services in this process on 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
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
