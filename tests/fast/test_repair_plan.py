"""Repair planning (blocks/repair.py): which blocks are repaired, in what order, from
which threshold on, and how an ended agreement reaches the plan. Real LMDB, a real
peer list and ledger; no shard moves (that is test_repair.py, with real peers)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
import trio
from inproc import LocalStore, PeerNode, until

from fluidfs import keys
from fluidfs.blocks import repair
from fluidfs.blocks.codec import NONCE_SIZE, WRAPPED_KEY_SIZE, BlockRecord
from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.blocks.remote import RemoteShards
from fluidfs.blocks.repair import Repairer, RepairPolicy, has_room, plan

N = 4
SHARD = 1000
RING = keys.KeyRing(keys.generate(shards_total=N, shards_needed=2))


def block(n: int, holders: list[int], shard_size: int = SHARD) -> StoredBlock:
    block_id = hashlib.blake2b(struct.pack(">Q", n), digest_size=32).digest()
    ids = tuple(block_id[:28] + struct.pack(">I", i) for i in range(len(holders)))
    record = BlockRecord(
        block_id, 4 * shard_size, shard_size, 2, bytes(WRAPPED_KEY_SIZE), bytes(NONCE_SIZE), ids
    )
    return StoredBlock(record, 1, holders)


def bid(stored: StoredBlock) -> bytes:
    return stored.record.block_id


X = NO_HOLDER


def test_the_most_endangered_blocks_come_first_and_busy_or_stuck_ones_wait() -> None:
    one_lost = block(1, [1, 2, 3, X])
    two_lost = block(2, [1, 2, X, X])
    three_lost = block(3, [1, X, X, X])
    also_one = block(4, [1, 2, X, 3])
    uploading = block(5, [X, X, X, X])
    # Peer 4 is the only one free of the block: it needs room for one shard.
    assert not has_room(one_lost, {1: SHARD, 4: SHARD // 2})
    assert has_room(one_lost, {1: SHARD, 4: SHARD})
    records = [one_lost, two_lost, three_lost, also_one, uploading]
    open_peers = {1: 10 * SHARD, 2: 10 * SHARD, 3: 10 * SHARD, 5: 10 * SHARD}
    got = plan(records, open_peers, frozenset({bid(uploading)}))
    assert got == [(3, bid(three_lost)), (2, bid(two_lost)), (1, bid(one_lost)),
                   (1, bid(also_one))], "most missing first; ties in the order found"
    assert plan(records, {1: SHARD, 2: SHARD, 3: SHARD}, frozenset()) == [
        (4, bid(uploading)), (3, bid(three_lost)), (2, bid(two_lost))
    ], "blocks every open peer already holds a shard of wait for the next pass"


@pytest.fixture
def store(tmp_path: Path):
    made = LocalStore(tmp_path / "state", RING)
    yield made
    made.close()


@pytest.fixture
def owner(tmp_path: Path):
    made = PeerNode(tmp_path / "owner", RING)
    yield made
    made.close()


def with_peers(store: LocalStore, owner: PeerNode, count: int) -> list[int]:
    """*count* peers with agreements (room for many shards); their holder indexes."""
    indexes = []
    for _ in range(count):
        key = os.urandom(32)
        owner.ledger.record(key, we_host=1 << 20, they_host=1 << 20, term=3600)
        indexes.append(owner.peers.add(key, "127.0.0.1:9").index)
    remote = RemoteShards(owner.conns, owner.peers, owner.ledger, store.codec, store.limiter)
    store.blocks.use_network(remote)
    return indexes


def save(store: LocalStore, *blocks: StoredBlock) -> None:
    with store.db.write() as txn:
        for stored in blocks:
            store.blocks.save(txn, stored)


async def test_a_pass_is_planned_from_the_records_in_batches(
    store: LocalStore, owner: PeerNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repair, "PLAN_BATCH", 2)
    p = with_peers(store, owner, N + 1)
    made = [block(i, [p[0], p[1]] + [X] * (i % 3) + [p[2]] * (2 - i % 3)) for i in range(7)]
    save(store, *made)
    gone = os.urandom(32)  # deleted since it was found short
    store.blocks.under.update({bid(s) for s in made} | {gone})
    repairer = Repairer(store.blocks, RepairPolicy())
    got = await repairer._candidates()
    assert [n for n, _ in got] == [2, 2, 1, 1], "the most missing first"
    assert {b for _, b in got} == {bid(s) for s in made if s.missing()}
    assert store.blocks.under == {bid(s) for s in made if s.missing()}, (
        "blocks deleted or whole again leave the queue"
    )


async def test_the_threshold_decides_which_losses_are_repaired(
    store: LocalStore, owner: PeerNode
) -> None:
    p = with_peers(store, owner, N + 1)
    store.blocks.total_missing_allowed = 1  # repair at N-2 live shards or fewer
    loses_one = block(1, [p[0], p[1], p[2], p[3]])
    loses_two = block(2, [p[0], p[0], p[2], p[3]])
    already_short = block(3, [p[1], p[2], p[3], X])
    save(store, loses_one, loses_two, already_short)
    assert await store.blocks.forget_holder(p[0]) == 1 + 2
    assert store.blocks.under == {bid(loses_two)}
    store.blocks.under.clear()
    store.blocks.total_missing_allowed = 0  # the default: any lost shard is re-created
    assert await store.blocks.find_under_replicated() == 3


async def test_an_ended_agreement_is_forgotten_in_the_background(
    store: LocalStore, caplog: pytest.LogCaptureFixture
) -> None:
    stored = block(1, [7, 8, 9, 9])
    save(store, stored)
    repairer = Repairer(store.blocks, RepairPolicy(interval=3600))
    caplog.set_level("INFO", logger="fluidfs.blocks.repair")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(repairer.run)
        repairer.holder_gone(9, "peer nine")  # returns at once
        await until(lambda: "peer nine ended: 2 shards" in caplog.text, what="the log line")
        assert store.blocks.load(bid(stored)).holders == [7, 8, X, X]
        assert store.blocks.under == {bid(stored)}
        nursery.cancel_scope.cancel()
