"""An owner's local store wired to hosts in-process, as the repair and accounting tests
set it up: the owner ``PeerNode`` holds an agreement with each host and the store's
blocks go to them through the real ``RemoteShards``."""

from __future__ import annotations

from collections.abc import Iterable

from inproc import MIB, LocalStore, PeerNode

from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.blocks.remote import RemoteShards


def store_through(store: LocalStore, owner: PeerNode, hosts: Iterable[PeerNode],
                  size: int = 64 * MIB) -> None:
    """Send *store*'s shards through *owner*, which agrees *size* bytes with each host."""
    for host in hosts:
        owner.use(host, size)
    store.blocks.use_network(
        RemoteShards(owner.conns, owner.peers, owner.ledger, store.codec, store.limiter))


async def upload(store: LocalStore, data: bytes) -> StoredBlock:
    """Seal *data* as a block, upload its shards, and return the block as stored."""
    record, shards = store.codec.seal(data, store.codec.block_id(data))
    with store.db.write() as txn:
        store.blocks.save(txn, StoredBlock(record, 1, [NO_HOLDER] * store.codec.total))
    await store.blocks.upload(record, shards)
    return store.blocks.load(record.block_id)
