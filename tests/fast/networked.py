"""An owner's local store wired to hosts in-process, as the repair and accounting tests
set it up: the owner ``PeerNode`` holds an agreement with each host and the store's
blocks go to them through the real ``RemoteShards``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from inproc import MIB, LocalStore, PeerNode, peer_nodes

from fluidfs import keys
from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.blocks.remote import RemoteShards
from fluidfs.service.host import PeerService


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


@asynccontextmanager
async def storing_through(
    tmp_path: Path, count: int, ring: keys.KeyRing, *,
    service: type[PeerService] = PeerService,
) -> AsyncIterator[tuple[LocalStore, PeerNode, list[PeerNode]]]:
    """An owner (a block store over *ring*) storing through *count* listening hosts
    running *service*: (store, owner, hosts); the store and the owner closed on exit."""
    async with peer_nodes(tmp_path, count, service=service) as (nursery, hosts):
        owner = await PeerNode(tmp_path / "owner", ring).start(nursery, listen=False)
        store = LocalStore(tmp_path / "state", ring)
        try:
            store_through(store, owner, hosts)
            yield store, owner, hosts
        finally:
            store.close()
            owner.close()
