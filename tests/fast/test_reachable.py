"""Truthful health (issue 19): agreed holders count until their tolerance ends, so the
redundancy xattr and `fluidfs status` also show how many shards are *reachable* now —
held by a peer that is not failing — and status lists the failing holders and since when.

Real LMDB, a real peer list and ledger; no shard moves.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import trio
from inproc import LocalStore, PeerNode

from fluidfs import keys
from fluidfs.blocks.audit import Auditor, AuditPolicy
from fluidfs.blocks.codec import NONCE_SIZE, WRAPPED_KEY_SIZE, BlockRecord
from fluidfs.blocks.migrate import Migrator
from fluidfs.blocks.record import StoredBlock
from fluidfs.blocks.remote import RemoteShards
from fluidfs.blocks.repair import Repairer, RepairPolicy
from fluidfs.fs.health import redundancy
from fluidfs.fs.tree import BLOCK_REF, ROOT_INO
from fluidfs.node.status import NodeStatus, UploadRate

N = 4
RING = keys.KeyRing(keys.generate(shards_total=N, shards_needed=2))


def block(n: int, holders: list[int]) -> StoredBlock:
    block_id = hashlib.blake2b(struct.pack(">Q", n), digest_size=32).digest()
    ids = tuple(block_id[:28] + struct.pack(">I", i) for i in range(len(holders)))
    record = BlockRecord(
        block_id, 4000, 1000, 2, bytes(WRAPPED_KEY_SIZE), bytes(NONCE_SIZE), ids
    )
    return StoredBlock(record, 1, holders)


def file_of(store: LocalStore, name: str, *blocks: StoredBlock) -> int:
    ino = store.new_inode(ROOT_INO, name, stat.S_IFREG | 0o644).ino
    with store.db.write() as txn:
        for index, stored in enumerate(blocks):
            store.blocks.save(txn, stored)
            store.tree.set_block(txn, ino, index, BLOCK_REF + stored.record.block_id)
    return ino


def status_of(store: LocalStore, owner: PeerNode) -> NodeStatus:
    return NodeStatus(
        peer_id="me", meta=store.db, blocks=store.blocks, codec=store.codec,
        shards=store.shards, data=store.data, conns=owner.conns, peers=owner.peers,
        ledger=owner.ledger, service=owner.service,
        repairer=Repairer(store.blocks, RepairPolicy()), migrator=Migrator(store.blocks),
        auditor=Auditor(store.blocks, store.blocks.remote, AuditPolicy()),
        upload=UploadRate(store.blocks), metadata_ids=set, commit_status=dict,
    )


def test_failing_holders_show_as_unreachable_beside_the_agreed_ones(tmp_path: Path) -> None:
    """Before this change the xattr said "4/4" and status had no reachable figures while
    two of the four holders were failing."""
    store = LocalStore(tmp_path / "state", RING)
    owner = PeerNode(tmp_path / "owner", RING)
    try:
        peer_keys = [os.urandom(32) for _ in range(N + 1)]
        p = []
        for key in peer_keys:
            owner.ledger.record(key, we_host=1 << 20, they_host=1 << 20, term=3600)
            p.append(owner.peers.add(key, "127.0.0.1:9").index)
        remote = RemoteShards(owner.conns, owner.peers, owner.ledger, store.codec, store.limiter)
        store.blocks.use_network(remote)
        whole = file_of(store, "whole", block(1, [p[0], p[1], p[2], p[3]]))
        mixed = file_of(store, "mixed", block(2, [p[0], p[1], p[2], p[3]]),
                        block(3, [p[4], p[1], p[2], p[3]]))
        assert redundancy(store.tree, store.blocks, whole) == "4/4"

        owner.ledger.failed(peer_keys[0])  # an audit got no answer
        assert redundancy(store.tree, store.blocks, whole) == "4/4 (3 reachable)"
        owner.ledger.failed(peer_keys[1])
        assert redundancy(store.tree, store.blocks, whole) == "4/4 (2 reachable)"
        assert redundancy(store.tree, store.blocks, mixed) == "4/4 (2 reachable)", (
            "the worst block counts"
        )

        status = status_of(store, owner)
        figures = trio.run(status.report)
        assert figures["redundancy"] == {"4": 3}, "agreed holders still count"
        assert figures["reachable"] == {"3": 1, "2": 2}
        failing = {p["id"] for p in figures["peers_failing"]}
        assert failing == {keys.encode_peer_id(k) for k in peer_keys[:2]}
        assert all(p["since"] > 0 for p in figures["peers_failing"])

        owner.ledger.passed(peer_keys[0])  # back: it answers again
        owner.ledger.passed(peer_keys[1])
        assert redundancy(store.tree, store.blocks, whole) == "4/4"
        assert trio.run(status.report)["reachable"] == {"4": 3}
    finally:
        owner.close()
        store.close()
