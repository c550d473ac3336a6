"""The figures behind `fluidfs status`: redundancy, uploads, repair, audit, commits.

Everything here reads; nothing changes. The one scan that grows with the data (every
block record, for the redundancy levels) runs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from fluidfs.blocks.audit import Auditor
from fluidfs.blocks.blockstore import BlockStore
from fluidfs.blocks.codec import BlockCodec
from fluidfs.blocks.migrate import Migrator
from fluidfs.blocks.record import LOCAL_HOLDER, StoredBlock
from fluidfs.blocks.repair import Repairer
from fluidfs.fs.filedata import FileData
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.host import PeerService
from fluidfs.store.db import Database
from fluidfs.store.shards import ShardStore

RATE_WEIGHT = 0.3  # weight of the last second in the upload rate


class UploadRate:
    """Bytes uploaded per second, exponentially weighted over the last seconds."""

    def __init__(self, blocks: BlockStore) -> None:
        self.blocks = blocks
        self.rate = 0.0

    async def run(self) -> None:
        """Measure once a second until cancelled."""
        last = self.blocks.uploaded_bytes
        while True:
            await trio.sleep(1.0)
            now = self.blocks.uploaded_bytes
            self.rate = (1 - RATE_WEIGHT) * self.rate + RATE_WEIGHT * (now - last)
            last = now


Scanned = tuple[dict[str, int], int, set[bytes]]


class NodeStatus:
    """Answers `fluidfs status`."""

    def __init__(
        self,
        peer_id: str,
        meta: Database,
        blocks: BlockStore,
        codec: BlockCodec,
        shards: ShardStore,
        data: FileData,
        conns: Connections,
        peers: PeerList,
        ledger: Ledger,
        service: PeerService,
        repairer: Repairer,
        migrator: Migrator,
        auditor: Auditor,
        upload: UploadRate,
        *,
        metadata_ids: Callable[[], set[bytes]],
        commit_status: Callable[[], dict[str, Any]],
    ) -> None:
        self.peer_id = peer_id
        self.meta = meta
        self.blocks = blocks
        self.codec = codec
        self.shards = shards
        self.data = data
        self.conns = conns
        self.peers = peers
        self.ledger = ledger
        self.service = service
        self.repairer = repairer
        self.migrator = migrator
        self.auditor = auditor
        self.upload = upload
        self.metadata_ids = metadata_ids  # blocks holding metadata nodes: reported apart
        self.commit_status = commit_status

    async def report(self) -> dict[str, Any]:
        """The figures, with the block scan in a worker thread."""
        scanned = await trio.to_thread.run_sync(self.redundancy_levels, limiter=self.blocks.limiter)
        return self.figures(scanned)

    def redundancy_levels(self) -> Scanned:
        """Data blocks per redundancy level, bytes of shards still to upload, metadata ids.

        A scan of every block record: run it in a worker thread. Metadata blocks
        are reported apart.
        """
        nodes = self.metadata_ids()
        levels: dict[str, int] = {}
        pending = 0
        with self.meta.read() as txn:
            for key, raw in txn.cursor(db=self.meta["blocks"]):
                if bytes(key) in nodes:
                    continue
                stored = StoredBlock.decode(bytes(key), raw)
                if LOCAL_HOLDER in stored.holders:
                    level = "local"
                else:
                    level = str(stored.record.total - stored.missing())
                    pending += stored.missing() * stored.record.shard_size
                levels[level] = levels.get(level, 0) + 1
        return levels, pending, nodes

    def figures(self, scanned: Scanned) -> dict[str, Any]:
        """Figures for `fluidfs status` (*scanned*: a result of redundancy_levels)."""
        levels, pending, nodes = scanned
        own = self.shards.used(self.blocks.owner)  # shards of ours kept here (no peers yet)
        order = sorted(levels, key=lambda k: -1 if k == "local" else int(k), reverse=True)
        return {
            "peer_id": self.peer_id,
            "listen": self.conns.listen_addr,
            "peers_known": len(self.peers),
            "peers_with_agreements": len(self.ledger.active()),
            "shards_total": self.codec.total,
            "shards_needed": self.codec.needed,
            "blocks": sum(levels.values()),
            "redundancy": {k: levels[k] for k in order},
            "under_replicated": len(self.blocks.under - nodes),
            "uploaded_bytes": self.blocks.uploaded_bytes,
            "upload_pending_bytes": pending,
            "upload_rate": self.upload.rate,
            "unsealed_bytes": self.data.pending_bytes(),
            "hosted_bytes": self.service.hosted_total() - own,
            "local_shard_bytes": own,
            "network": self.blocks.remote is not None,
            "repair_queue": self.repairer.queue_length,
            "repaired_bytes": self.repairer.repaired_bytes,
            "repair_rate": self.repairer.rate,
            "repair_bandwidth": self.repairer.policy.bandwidth,
            "moved_to_peers_blocks": self.migrator.moved_blocks,
            "audit_cycles": self.auditor.cycles,
            "audit_challenges": self.auditor.challenges,
            "gc_pending_bytes": self.blocks.collector.pending()[1],
            "commit": self.commit_status(),
        }
