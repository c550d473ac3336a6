"""Emergency repair (issue 18 item 1, blocks/emergency.py): a block whose reachable
shards fall to K+1 or fewer is repaired before its silent holders' tolerance ends; the
copies those holders keep are collected once they return, and their agreements go on.
Blocks with only one or two silent holders wait for the tolerance as before.

Owner and its sixteen hosts are real peer services on 127.0.0.1 in this process, over
real LMDB; holders "fall silent" as the auditor sees it: their service stops answering
and the owner's ledger marks them failing (``Ledger.failed``, what an unanswered audit
does)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio
from inproc import LocalStore, PeerNode, peer_nodes, run_delay, until
from networked import store_through

from fluidfs import keys
from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.blocks.repair import Repairer, RepairPolicy, plan
from fluidfs.service.host import PeerService

K, N = 8, 12
HOSTS = 16
RING = keys.KeyRing(keys.generate(shards_total=N, shards_needed=K))
BANDWIDTH = 1 << 20  # the repair budget, bytes placed per second


class Switchable(PeerService):
    """A real peer service that can be made to stop answering (a machine gone offline),
    and that runs *before_store* before storing (to let a holder return mid-repair)."""

    silent = False
    before_store = None

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if self.silent:
            await trio.sleep_forever()
        if op == "StoreShard" and self.before_store is not None:
            self.before_store()
        return await super().handle(peer_key, op, args)


async def upload(store: LocalStore, size: int = 100_000) -> StoredBlock:
    data = os.urandom(size)
    record, shards = store.codec.seal(data, store.codec.block_id(data))
    with store.db.write() as txn:
        store.blocks.save(txn, StoredBlock(record, 1, [NO_HOLDER] * N))
    await store.blocks.upload(record, shards)
    stored = store.blocks.load(record.block_id)
    assert NO_HOLDER not in stored.holders
    return stored


def reachable(store: LocalStore, stored: StoredBlock) -> int:
    now = store.blocks.load(stored.record.block_id)
    return now.reachable(store.blocks.remote.failing_holders())


class Lab:
    """The owner, its hosts, and helpers to silence and bring back holders."""

    def __init__(self, store: LocalStore, owner: PeerNode, hosts: list[PeerNode]) -> None:
        self.store = store
        self.owner = owner
        self.hosts = hosts
        self.by_index = {owner.peers.get(h.key).index: h for h in hosts}

    def silence(self, holders: list[int]) -> None:
        for holder in holders:
            host = self.by_index[holder]
            host.service.silent = True
            self.owner.ledger.failed(host.key)

    def bring_back(self, holders: list[int]) -> None:
        for holder in holders:
            host = self.by_index[holder]
            host.service.silent = False
            self.owner.ledger.passed(host.key)  # what its next good audit does

    def assert_usage_matches_and_agreements_live(self) -> None:
        for host in self.hosts:
            ours = self.owner.ledger.get(host.key)
            assert ours.active and ours.failing_since is None
            assert host.ledger.get(self.owner.key).active
            assert ours.they_use == host.shards.used(self.owner.key), "usage figures agree"

    def assert_hosts_keep_only_what_records_name(self, blocks: list[StoredBlock]) -> None:
        named: dict[int, set[bytes]] = {i: set() for i in self.by_index}
        for stored in blocks:
            now = self.store.blocks.load(stored.record.block_id)
            for shard_id, holder in zip(now.record.shard_ids, now.holders, strict=True):
                named[holder].add(shard_id)
        for index, host in self.by_index.items():
            assert set(host.shards.ids(self.owner.key)) == named[index]


async def with_lab(tmp_path: Path, body) -> None:
    store = LocalStore(tmp_path / "state", RING)
    owner: PeerNode | None = None
    try:
        async with peer_nodes(tmp_path, HOSTS, service=Switchable) as (nursery, hosts):
            owner = await PeerNode(tmp_path / "owner", RING).start(nursery, listen=False)
            store_through(store, owner, hosts)
            await body(Lab(store, owner, hosts), nursery)
            nursery.cancel_scope.cancel()
    finally:
        # Only once the nursery is done: a repair pass's worker thread may still be
        # reading the store when the cancel is made.
        store.close()
        if owner is not None:
            owner.close()


def test_danger_is_reachable_shards_and_the_most_endangered_come_first() -> None:
    """Before, failing holders counted as live: the block with four silent holders came
    after one that had lost a single shard."""
    import hashlib

    from fluidfs.blocks.codec import NONCE_SIZE, WRAPPED_KEY_SIZE, BlockRecord

    def block(n: int, holders: list[int]) -> StoredBlock:
        block_id = hashlib.blake2b(bytes([n]), digest_size=32).digest()
        ids = tuple(block_id[:31] + bytes([i]) for i in range(N))
        record = BlockRecord(block_id, 8000, 1000, K, bytes(WRAPPED_KEY_SIZE),
                             bytes(NONCE_SIZE), ids)
        return StoredBlock(record, 1, holders)

    one_lost = block(1, [*range(20, 31), NO_HOLDER])
    four_silent = block(2, list(range(1, 13)))
    open_peers = {i: 10_000 for i in range(1, 40)}
    got = plan([one_lost, four_silent], open_peers, frozenset(), frozenset({9, 10, 11, 12}))
    assert got == [(4, four_silent.record.block_id), (1, one_lost.record.block_id)]


async def test_an_endangered_block_is_repaired_before_the_tolerance_and_reclaimed_after(
    tmp_path: Path,
) -> None:
    """On main this failed at the first emergency wait: with 4 of 12 holders silent the
    blocks stayed at 8 reachable shards until the agreements would end (a day)."""

    async def body(lab: Lab, nursery: trio.Nursery) -> None:
        store = lab.store
        blocks = [await upload(store) for _ in range(3)]
        holders = blocks[0].holders
        repairer = Repairer(store.blocks, RepairPolicy(interval=0.02, bandwidth=BANDWIDTH))
        nursery.start_soon(repairer.run)

        # One, then two holders silent: inside the tolerance, nothing moves.
        lab.silence(holders[:1])
        await trio.sleep(0.1)  # several passes
        lab.silence(holders[1:2])
        await trio.sleep(0.2)
        assert repairer.repaired_blocks == 0
        assert [store.blocks.load(b.record.block_id).holders for b in blocks] == [
            b.holders for b in blocks
        ], "1-2 silent holders: blocks wait for the tolerance"

        # Four silent: a block with three or four shards on them is at K+1 reachable or
        # fewer and is repaired now; the others still wait.
        lab.silence(holders[2:4])
        silent = set(holders[:4])
        endangered = [b for b in blocks if len(silent & set(b.holders)) >= 3]
        waiting = [b for b in blocks if b not in endangered]
        assert blocks[0] in endangered
        started, queued = time.monotonic(), run_delay()
        shard_bytes = sum(len(silent & set(b.holders)) * b.record.shard_size
                          for b in endangered)
        budget = shard_bytes / BANDWIDTH
        # The bound is on wall time less this process's waits for a CPU (a machine at
        # load 30 stretches the wall time alone past it); the tolerance is a day.
        await until(lambda: all(reachable(store, b) == N for b in endangered),
                    timeout=budget + 60, what="12 reachable shards again")
        took = time.monotonic() - started - (run_delay() - queued)
        assert took <= budget + 1.5
        assert repairer.emergency_repairs == len(endangered)
        for b in endangered:
            now = store.blocks.load(b.record.block_id)
            assert silent.isdisjoint(now.holders) and NO_HOLDER not in now.holders
            assert len(set(now.holders)) == N
        for b in waiting:
            assert store.blocks.load(b.record.block_id).holders == b.holders
        for holder in silent:  # nothing deleted while they were away
            kept = set(lab.by_index[holder].shards.ids(lab.owner.key))
            assert kept == {sid for b in blocks
                            for sid, h in zip(b.record.shard_ids, b.holders, strict=True)
                            if h == holder}
        assert store.blocks.collector.pending()[0] == sum(
            len(silent & set(b.holders)) for b in endangered
        ), "their copies are queued for collection, counted"

        # They come back: the surplus goes, their agreements and figures stay true.
        lab.bring_back(list(silent))
        await store.blocks.collector.collect()
        assert store.blocks.collector.pending() == (0, 0)
        lab.assert_hosts_keep_only_what_records_name(blocks)
        lab.assert_usage_matches_and_agreements_live()
        for b in blocks:
            assert await store.blocks.rebuild(store.blocks.load(b.record.block_id))

    await with_lab(tmp_path, body)


async def test_a_holder_back_before_the_repair_is_recorded_keeps_its_copy(
    tmp_path: Path,
) -> None:
    """The old copy counts again; the one just placed elsewhere is taken back."""

    async def body(lab: Lab, nursery: trio.Nursery) -> None:
        store = lab.store
        stored = await upload(store)
        silent = stored.holders[:4]
        lab.silence(silent)
        returning = lab.by_index[silent[0]]
        for host in lab.hosts:  # it returns while the new copies are being stored
            host.service.before_store = lambda: lab.bring_back([silent[0]])
        repairer = Repairer(store.blocks, RepairPolicy(interval=0.02, bandwidth=BANDWIDTH))
        nursery.start_soon(repairer.run)
        block_id = stored.record.block_id
        await until(lambda: store.blocks.load(block_id).holders != stored.holders,
                    what="the repair recorded")
        now = store.blocks.load(block_id)
        assert now.holders[0] == silent[0], "its copy counts again"
        assert set(now.holders[1:4]).isdisjoint(silent[1:4])
        assert returning.shards.get(lab.owner.key, stored.record.shard_ids[0])
        for host in lab.hosts:
            host.service.before_store = None
        lab.bring_back(silent)
        await store.blocks.collector.collect()
        lab.assert_hosts_keep_only_what_records_name([stored])
        lab.assert_usage_matches_and_agreements_live()

    await with_lab(tmp_path, body)


async def test_a_shard_placed_back_on_a_holder_awaiting_its_deletion_is_kept(
    tmp_path: Path,
) -> None:
    """After an emergency the returned holder's old copy waits in the collector's queue.
    If a later repair puts that very shard back there, the queued delete must not run:
    before, the collector deleted the copy the record named (and our usage figure for
    the holder counted it twice)."""

    async def body(lab: Lab, nursery: trio.Nursery) -> None:
        store = lab.store
        stored = await upload(store)
        block_id, ids = stored.record.block_id, stored.record.shard_ids
        silent = stored.holders[:4]
        lab.silence(silent)
        repairer = Repairer(store.blocks, RepairPolicy(interval=0.02, bandwidth=BANDWIDTH))
        nursery.start_soon(repairer.run)
        await until(lambda: reachable(store, stored) == N, what="the emergency repair")
        lab.bring_back(silent)  # back, but not yet collected
        stand_in = store.blocks.load(block_id).holders[0]
        for other in [*silent[1:], stand_in]:  # only shard 0's old holder can take it now
            store.blocks.remote.full.add(lab.by_index[other].key)
        # Its stand-in lost it (really: a copy still there would be found and recorded
        # again by the repairer's look for unrecorded holders, blocks/repair.py).
        lab.by_index[stand_in].shards.delete_counted(lab.owner.key, [ids[0]])
        store.blocks.mark_lost(block_id, 0, stand_in)
        await until(lambda: store.blocks.load(block_id).holders[0] == silent[0],
                    what="shard 0 placed back on its old holder")
        store.blocks.remote.full.clear()
        await store.blocks.collector.collect()
        assert lab.by_index[silent[0]].shards.get(lab.owner.key, ids[0]), "kept"
        lab.assert_hosts_keep_only_what_records_name([stored])
        lab.assert_usage_matches_and_agreements_live()
        assert await store.blocks.rebuild(store.blocks.load(block_id))

    await with_lab(tmp_path, body)
