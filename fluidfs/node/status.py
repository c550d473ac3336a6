"""The figures behind `fluidfs status`: redundancy, uploads, repair, audit, commits.

Everything here reads; nothing changes. Every read of the stores (each block record for
the redundancy levels, shard usage, the GC queue) runs in one worker-thread call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fluidfs.blocks.audit import Auditor
from fluidfs.blocks.blockstore import BlockStore
from fluidfs.blocks.codec import BlockCodec
from fluidfs.blocks.durability import OBSERVED_WINDOW_DAYS, estimate
from fluidfs.blocks.migrate import Migrator
from fluidfs.blocks.record import LOCAL_HOLDER, StoredBlock
from fluidfs.blocks.repair import Repairer
from fluidfs.diskspace import free_bytes
from fluidfs.fs.filedata import FileData
from fluidfs.fs.inode import record_is_reg
from fluidfs.keys import encode_peer_id
from fluidfs.node.overview import overview
from fluidfs.node.traffic import TrafficRate
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.host import PeerService
from fluidfs.store.compact import StoreUsage
from fluidfs.store.db import SCAN_BATCH, Database
from fluidfs.store.shards import ShardStore
from fluidfs.sysutil import process_memory

RATE_WEIGHT = 0.3  # weight of the last second in the upload rate
GONE_WITHIN = 7 * 86400.0  # an agreement that ended this recently is "provider gone"


@dataclass
class UploadRate:
    """Bytes uploaded per second, exponentially weighted over the last seconds."""

    blocks: BlockStore
    rate: float = 0.0

    async def run(self) -> None:
        """Measure once a second until cancelled."""
        last = self.blocks.uploaded_bytes
        while True:
            await trio.sleep(1.0)
            now = self.blocks.uploaded_bytes
            self.rate = (1 - RATE_WEIGHT) * self.rate + RATE_WEIGHT * (now - last)
            last = now


@dataclass
class Scanned:
    """What status reads from the stores (in a worker thread: it grows with the data)."""

    levels: dict[str, int]  # data blocks per redundancy level ("local", "12", …)
    pending: int  # bytes of shards still to upload
    nodes: set[bytes]  # ids of blocks holding metadata nodes, reported apart
    own: int  # bytes of our own shards kept here (no peers yet)
    hosted: int  # bytes of shards kept here for everyone, us included
    gc_pending: int  # bytes of shards waiting to be deleted
    files: int = 0  # regular files in the live tree
    disk_free: int = 0  # bytes free on the disk holding the state directory
    disk_total: int = 0
    # data blocks per number of shards whose holder is not failing now ("12", "10", …)
    reachable: dict[str, int] = field(default_factory=dict)
    meta_usage: StoreUsage | None = None  # meta.lmdb's file against its tables


@dataclass
class NodeStatus:
    """Answers `fluidfs status`."""

    peer_id: str
    meta: Database
    blocks: BlockStore
    codec: BlockCodec
    shards: ShardStore
    data: FileData
    conns: Connections
    peers: PeerList
    ledger: Ledger
    service: PeerService
    repairer: Repairer
    migrator: Migrator
    auditor: Auditor
    upload: UploadRate
    metadata_ids: Callable[[], set[bytes]]  # blocks holding metadata nodes
    commit_status: Callable[[], dict[str, Any]]
    state_path: Path | None = None  # for the disk figures
    keyfile_saved: Callable[[], bool] = lambda: True  # keysaved.py
    traffic: TrafficRate | None = None  # rates to and from peers, limits (node/traffic.py)
    tolerance: float = 86400.0  # seconds of failure before an agreement ends (lifecycle)
    grouped: bool = True  # placement keeps blocks within groups of N peers (copysets)
    fuse_requests: Callable[[], dict[str, int]] = dict  # FUSE requests by operation
    fuse_loop: Callable[[], dict[str, int]] = dict  # the session loop's counts (fuseloop.py)

    async def report(self) -> dict[str, Any]:
        """The figures, with every store read in a worker thread."""
        remote = self.blocks.remote
        failing = remote.failing_holders() if remote is not None else set()
        scanned = await trio.to_thread.run_sync(
            self.scan, failing, limiter=self.blocks.limiter
        )
        return self.figures(scanned)

    def scan(self, failing: frozenset[int] | set[int] = frozenset()) -> Scanned:
        """Read the stores: every block record, shard usage and the GC queue.

        *failing*: holders that do not count as reachable now. Blocking and
        proportional to the data: run it in a worker thread.
        """
        nodes = self.metadata_ids()
        levels: dict[str, int] = {}
        reachable: dict[str, int] = {}
        pending = 0
        for key, raw in self.meta.records("blocks", SCAN_BATCH):
            if key in nodes:
                continue
            stored = StoredBlock.decode(key, raw)
            if LOCAL_HOLDER in stored.holders:
                level = "local"
            else:
                level = str(stored.record.total - stored.missing())
                pending += stored.missing() * stored.record.shard_size
                up = str(stored.reachable(failing))
                reachable[up] = reachable.get(up, 0) + 1
            levels[level] = levels.get(level, 0) + 1
        inodes = self.meta.records("inodes", SCAN_BATCH)
        files = sum(record_is_reg(raw) for _key, raw in inodes)
        self.meta.release_pages()  # the scan mapped every record: not ours to keep
        disk_free = disk_total = 0
        if self.state_path is not None:
            disk_free = free_bytes(self.state_path)
            disk_total = _disk_total(self.state_path)
        return Scanned(
            meta_usage=self.meta.usage(),
            files=files,
            disk_free=disk_free,
            disk_total=disk_total,
            levels=levels,
            reachable=reachable,
            pending=pending,
            nodes=nodes,
            own=self.shards.used(self.blocks.owner),
            hosted=self.service.hosted_total(),
            gc_pending=self.blocks.collector.pending()[1],
        )

    def figures(self, scanned: Scanned) -> dict[str, Any]:
        """Figures for `fluidfs status` from *scanned* (a result of scan), with the
        overview (node/overview.py): the one sentence that says whether it is safe."""
        levels = scanned.levels
        order = sorted(levels, key=lambda k: -1 if k == "local" else int(k), reverse=True)
        now = time.time()
        failing = [
            {"id": encode_peer_id(a.peer), "since": a.failing_since}
            for a in sorted(self.ledger.active(), key=lambda a: a.failing_since or 0)
            if a.failing_since is not None
        ]
        gone = [a for a in self.ledger.ended() if now - (a.ended_at or 0) < GONE_WITHIN]
        figures = {
            "peer_id": self.peer_id,
            "listen": self.conns.listen_addr,
            "peers_known": len(self.peers),
            "peers_with_agreements": len(self.ledger.active()),
            "shards_total": self.codec.total,
            "shards_needed": self.codec.needed,
            "blocks": sum(levels.values()),
            "redundancy": {k: levels[k] for k in order},
            "reachable": {k: scanned.reachable[k]
                          for k in sorted(scanned.reachable, key=int, reverse=True)},
            "under_replicated": len(self.blocks.under - scanned.nodes),
            "uploaded_bytes": self.blocks.uploaded_bytes,
            "upload_pending_bytes": scanned.pending,
            "upload_rate": self.upload.rate,
            "unsealed_bytes": self.data.pending_bytes(),
            "fsync_synced_blocks": self.blocks.synced_files,
            "hosted_bytes": scanned.hosted - scanned.own,
            "local_shard_bytes": scanned.own,
            "network": self.blocks.remote is not None,
            "store_requests": (self.blocks.remote.store_requests()
                               if self.blocks.remote is not None else None),
            "retrieve_requests": (self.blocks.remote.retrieve_requests()
                                  if self.blocks.remote is not None else None),
            "fuse_requests": self.fuse_requests(),
            "fuse_loop": self.fuse_loop(),
            "repair_queue": self.repairer.queue_length,
            "endangered_blocks": len(self.repairer.endangered),
            "emergency_repairs": self.repairer.emergency_repairs,
            "repaired_bytes": self.repairer.repaired_bytes,
            "repair_rate": self.repairer.rate,
            "repair_bandwidth": self.repairer.policy.bandwidth,
            "moved_to_peers_blocks": self.migrator.moved_blocks,
            "audit_cycles": self.auditor.cycles,
            "audit_challenges": self.auditor.challenges,
            "audit_fetches": self.auditor.fetches,
            "gc_pending_bytes": scanned.gc_pending,
            "commit": self.commit_status(),
            "files": scanned.files,
            "peers_failing": failing,
            "providers_gone": len(gone),
            "keyfile_saved": self.keyfile_saved(),
            "disk_free": scanned.disk_free,
            "disk_total": scanned.disk_total,
            "memory": process_memory(),
        }
        traffic = self.traffic or TrafficRate(self.conns.bandwidth)
        figures.update(traffic.figures(scanned.pending, self.upload.rate))
        figures["durability"] = self.durability(figures, now)
        if self.conns.relay is not None:  # serve --relay: what relaying for others costs
            figures["relay"] = self.conns.relay.load()
        if scanned.meta_usage is not None:
            figures["meta_store"] = {
                "file_bytes": scanned.meta_usage.file_bytes,
                "live_bytes": scanned.meta_usage.live_bytes,
                "compaction_due": scanned.meta_usage.due,
            }
        figures["overview"] = overview(figures, now)
        return figures

    def durability(self, figures: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The estimated chance of losing data this year (blocks/durability.py), from the
        agreements' use, the ends we observed, and the repair rate (measured, or else
        the tightest of the repair cap and the bandwidth limits)."""
        agreements = list(self.ledger)
        window = OBSERVED_WINDOW_DAYS * 86400.0
        ended = [a for a in self.ledger.ended()
                 if a.ended_by_us and now - (a.ended_at or 0) < window]
        first = min((a.created for a in agreements if a.created), default=now)
        rate, measured = self.repairer.rate, self.repairer.rate > 0
        if not measured:
            limits = [self.repairer.policy.bandwidth]
            if figures.get("limit_download"):
                limits.append(figures["limit_download"] / self.codec.needed)
            if figures.get("limit_upload"):
                limits.append(figures["limit_upload"])
            rate = min(limits)
        found = estimate(
            holders=[a.they_use for a in self.ledger.active()],
            n=self.codec.total,
            k=self.codec.needed,
            grouped=self.grouped,
            tolerance_days=self.tolerance / 86400.0,
            repair_rate=rate,
            rate_measured=measured,
            ended_recently=len(ended),
            observed_days=(now - first) / 86400.0,
        )
        return found.figures() if found is not None else None


def _disk_total(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize
