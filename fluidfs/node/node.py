"""The node: the one place that wires the parts together and runs them in one trio.run."""

from __future__ import annotations

import logging
import os
import signal
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from fluidfs import control
from fluidfs.blocks.audit import Auditor, AuditPolicy
from fluidfs.blocks.blockstore import BlockStore
from fluidfs.blocks.cache import BlockCache
from fluidfs.blocks.codec import BlockCodec
from fluidfs.blocks.migrate import Migrator
from fluidfs.blocks.record import LOCAL_HOLDER, StoredBlock
from fluidfs.blocks.remote import RemoteShards
from fluidfs.blocks.repair import Repairer, RepairPolicy
from fluidfs.diskspace import is_disk_full
from fluidfs.fs import health
from fluidfs.fs.filedata import FileData
from fluidfs.fs.inode import Inode, now_ns
from fluidfs.fs.layered import LayeredOperations
from fluidfs.fs.tree import ROOT_INO, Tree
from fluidfs.keys import KeyRing, encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.net.limits import DEFAULT_LIMITS, NetLimits
from fluidfs.node.supervise import supervise
from fluidfs.peers.address import format_host_port
from fluidfs.peers.agreements import DEFAULT_TERM, Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable, split_addr
from fluidfs.peers.discovery import Discovery, DiscoveryPolicy
from fluidfs.peers.lifecycle import Lifecycle, LifecyclePolicy
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.trust import TrustPolicy
from fluidfs.remount.remount import Remount, RemountError, RemountOptions
from fluidfs.service.faults import FaultInjection
from fluidfs.service.host import PeerService
from fluidfs.statedir import StateDir, fsname_for
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024
DEFAULT_CACHE_SIZE = 1 << 30
DEFAULT_DONATE = 16 << 30
DEFAULT_RATIO = 1.5
SYNC_INTERVAL = 30.0
SAVE_INTERVAL = 5.0
UPLOAD_DRAIN_SECONDS = 120.0
RELEASE_PAGES_INTERVAL = 0.5
PEER_WORKER_THREADS = 2  # the peer service's own limiter (docs/protocol.md §5)


class MountError(Exception):
    """The filesystem could not be mounted."""


@dataclass
class NodeConfig:
    """What a node needs to start."""

    keyring: KeyRing
    state: StateDir
    cache_size: int = DEFAULT_CACHE_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE
    worker_threads: int = 4
    listen: str | None = None
    donate: int = DEFAULT_DONATE
    bootstrap: list[str] = field(default_factory=list)
    ratio: float = DEFAULT_RATIO
    term: int = DEFAULT_TERM
    stores_data: bool = True  # False for `fluidfs serve`: accept agreements, propose none
    discovery: DiscoveryPolicy | None = None
    fault_rate: float = 0.0  # test-only fault injection in the peer service
    lie_on_retrieve: bool = False  # test-only: serve corrupted shards, answer audits honestly
    audit: AuditPolicy = field(default_factory=AuditPolicy)
    lifecycle: LifecyclePolicy = field(default_factory=LifecyclePolicy)
    repair: RepairPolicy = field(default_factory=RepairPolicy)
    trust: TrustPolicy = field(default_factory=TrustPolicy)
    even_placement: bool = False  # benchmark baseline: place uniformly at random
    repair_threshold: int | None = None  # repair at this many live shards or fewer; N-1
    remount: RemountOptions = field(default_factory=RemountOptions)  # commits, lease, restore
    net_limits: NetLimits = DEFAULT_LIMITS  # peer port caps, timeouts, budgets (net/limits.py)


class Node:
    """A fluidfs node: metadata, blockstore and filesystem over one state directory."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        keyring = config.keyring
        config.state.lock(keyring.peer_id)
        self.meta = Database(config.state.meta, META_TABLES)
        self.shards = ShardStore(config.state.shards)
        self.limiter = trio.CapacityLimiter(config.worker_threads)
        self.block_size = self._settled_block_size(config.block_size)
        self.codec = BlockCodec(
            dedup_key=keyring.dedup_key,
            wrap_key=keyring.wrap_key,
            needed=keyring.keyfile.shards_needed,
            total=keyring.keyfile.shards_total,
        )
        self.cache = BlockCache(config.state.cache, config.cache_size, lambda _bid: True)
        self.blocks = BlockStore(
            self.meta, self.shards, self.codec, self.cache, keyring.public_key, self.limiter
        )
        self.tree = Tree(self.meta)
        self.data = FileData(
            self.tree, self.blocks, config.state.dirty, self.block_size, self.limiter
        )
        self.ops = LayeredOperations(self.tree, self.data, str(config.state.path))
        self._ensure_root()
        self._wire_peers()
        self.remount = Remount(self, config.remount)
        self._fuse_open = False
        self._stopped = False
        self._upload_rate = 0.0

    def _wire_peers(self) -> None:
        config, keyring = self.config, self.config.keyring
        self.peers = PeerList(self.meta, keyring.public_key, config.trust)
        self.ledger = Ledger(self.meta)
        records = RecordStore(config.state.path / "records")
        self.service = PeerService(
            self.shards,
            self.ledger,
            self.peers,
            donate=config.donate,
            ratio=config.ratio,
            # Peers' work gets its own threads: a flood of requests cannot starve sealing.
            limiter=trio.CapacityLimiter(PEER_WORKER_THREADS),
            records=records,
            on_end=self._agreement_ended,
            faults=FaultInjection(config.fault_rate, config.lie_on_retrieve),
            cooldown=config.lifecycle.cooldown,
        )
        self.conns = Connections(
            keyring.signing_key,
            self.service,
            self.peers,
            limits=config.net_limits,
            is_partner=lambda key: self.ledger.live(key) is not None,
        )
        self.manager = PeerManager(
            self.conns,
            self.peers,
            self.ledger,
            donate=config.donate,
            agreement_size=config.donate // (2 * keyring.keyfile.shards_total),
            term=config.term,
            propose=config.stores_data,
            on_new_agreement=self._new_agreement,
        )
        policy = config.discovery or DiscoveryPolicy(target=2 * keyring.keyfile.shards_total)
        self.discovery = Discovery(self.conns, self.peers, self.ledger, self.manager, policy)
        self.remote = RemoteShards(self.conns, self.peers, self.ledger, self.codec, self.limiter)
        self.remote.even_placement = config.even_placement
        self.migrator = Migrator(self.blocks)
        # Repair a block once its live shards fall to the threshold (default N-1: any loss).
        threshold = config.repair_threshold or keyring.keyfile.shards_total - 1
        self.blocks.total_missing_allowed = max(0, keyring.keyfile.shards_total - threshold - 1)
        self.auditor = Auditor(self.blocks, self.remote, config.audit)
        self.repairer = Repairer(self.blocks, config.repair)
        self.lifecycle = Lifecycle(
            self.conns, self.ledger, self.shards, self.limiter, config.lifecycle,
            on_end=self._agreement_ended, records=records,
        )
        if config.bootstrap or len(self.ledger):
            self.blocks.use_network(self.remote)

    def _new_agreement(self, _key: bytes) -> None:
        """Shards can go to peers now; blocks kept only here can start moving there."""
        self.blocks.use_network(self.remote)
        self.migrator.wake()

    def _agreement_ended(self, key: bytes) -> None:
        """Our shards on that peer no longer count: repair takes over (the repairer
        forgets the holder in every block record in the background, then repairs)."""
        peer = self.peers.get(key)
        if peer is not None:
            self.repairer.holder_gone(peer.index, encode_peer_id(key)[:12])

    def _settled_block_size(self, wanted: int) -> int:
        """The block size is fixed when the state is created; later runs keep it."""
        with self.meta.write() as txn:
            raw = txn.get(b"block_size", db=self.meta["settings"])
            if raw is not None:
                return struct.unpack(">Q", raw)[0]
            txn.put(b"block_size", struct.pack(">Q", wanted), db=self.meta["settings"])
        return wanted

    def _ensure_root(self) -> None:
        if self.tree.get(ROOT_INO) is None:
            t = now_ns()
            root = Inode(
                ROOT_INO,
                stat.S_IFDIR | 0o755,
                os.getuid(),
                os.getgid(),
                nlink=2,
                atime_ns=t,
                mtime_ns=t,
                ctime_ns=t,
            )
            self.tree.save(root)

    async def start(self) -> None:
        """Recover from a crash: adopt dirty blocks, drop orphaned inodes, load the cache."""
        entries = await trio.to_thread.run_sync(self.cache.scan_io)
        self.cache.load(entries)
        orphans = self.blocks.recover_journal()
        if orphans:
            log.info("%d shards sent before a crash but never recorded: collecting them", orphans)
        recovered = await self.data.recover()
        if recovered:
            log.info("recovered %d unsealed blocks from the last run", recovered)
        for ino in self.tree.orphans():
            await self.data.remove(ino)
            with self.meta.write() as txn:
                self.tree.delete(txn, ino)

    async def stop(self) -> None:
        """Seal everything, give uploads a while to finish, and flush to disk."""
        if self._stopped:
            return
        self._stopped = True
        with trio.CancelScope(shield=True):
            await self.data.seal_all()
            try:
                await self.remount.on_stop()
            except Exception as exc:
                if not is_disk_full(exc, self.config.state.path):
                    raise
                log.error("no commit at unmount: the disk holding the state directory is full")
            with trio.move_on_after(UPLOAD_DRAIN_SECONDS):
                await self.blocks.drain()
            self.peers.save_all()
            self.ledger.save_all()
            await trio.to_thread.run_sync(self.meta.sync)
            await trio.to_thread.run_sync(self.shards.sync)

    def close(self) -> None:
        """Close the databases and release the state lock."""
        self.meta.close()
        self.shards.close()
        self.config.state.unlock()

    async def _sync_timer(self) -> None:
        elapsed = 0.0
        while True:
            await trio.sleep(SAVE_INTERVAL)
            await self.peers.flush()
            self.ledger.save_all()
            elapsed += SAVE_INTERVAL
            if elapsed >= SYNC_INTERVAL:
                elapsed = 0.0
                await trio.to_thread.run_sync(self.meta.sync)
                await trio.to_thread.run_sync(self.shards.sync)

    async def run_services(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the peer service, control socket and background loops until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.conns.run)
            if self.config.listen:
                host, port = split_addr(self.config.listen)
                bound = await nursery.start(self.conns.serve, host, port)
                self.conns.listen_addr = format_host_port(host, bound)
                self.config.state.publish("listen", self.conns.listen_addr + "\n")
                log.info("peer service listening on %s", self.conns.listen_addr)
            await nursery.start(control.serve, self.config.state.control, self.control_handlers())
            await nursery.start(self.blocks.run)
            # Each loop is supervised: whatever it raises is logged and it is restarted
            # with back-off, so no failure in one can end the node (fluidfs/node/supervise.py).
            for name, loop in [
                ("sync timer", self._sync_timer),
                ("reconnect", self.manager.reconnect_known),
                ("discovery", self.discovery.run),
                ("auditor", self.auditor.run),
                ("repairer", self.repairer.run),
                ("migrator", self.migrator.run),
                ("lifecycle", self.lifecycle.run),
                ("upload rate", self._measure_rate),
                ("shard pages", self._release_shard_pages),
            ]:
                nursery.start_soon(supervise, name, loop)
            for addr in self.config.bootstrap:
                nursery.start_soon(supervise, f"bootstrap {addr}", self.manager.bootstrap, addr)
            task_status.started()

    def control_handlers(self) -> dict[str, control.Handler]:
        """What `fluidfs peers`, `fluidfs status` and friends can ask."""

        async def peers(_request: dict) -> dict:
            rows = []
            for peer in self.peers:
                agreement = self.ledger.get(peer.key)
                rows.append(
                    {
                        "active": bool(agreement and agreement.active),
                        "id": encode_peer_id(peer.key),
                        "addr": peer.addr,
                        "last_seen": peer.last_seen,
                        "trust": peer.trust,
                        "we_host": agreement.we_host if agreement else 0,
                        "we_use": self.shards.used(peer.key),
                        "they_host": agreement.they_host if agreement else 0,
                        "they_use": agreement.they_use if agreement else 0,
                    }
                )
            return {"peers": rows}

        async def add_peer(request: dict) -> dict:
            addr = str(request.get("addr", ""))
            try:
                split_addr(addr)
                key, agreed = await self.manager.add(addr)
            except (ValueError, PeerUnavailable) as exc:
                raise control.ControlError(str(exc)) from None
            return {"id": encode_peer_id(key), "agreement": agreed}

        async def status(_request: dict) -> dict:
            scanned = await trio.to_thread.run_sync(self._redundancy_levels, limiter=self.limiter)
            return self.status(scanned)

        async def check_files(request: dict) -> dict:
            results = await health.check(
                self.tree,
                self.blocks,
                reachable=self._reachable_cache(),
                read_data=bool(request.get("read_data")),
            )
            return {"files": [vars(r) for r in results], "shards_needed": self.codec.needed}

        handlers = {"peers": peers, "add_peer": add_peer, "status": status, "check": check_files}
        return handlers | self.remount.control_handlers()

    def _reachable_cache(self):
        """A holder-index → answers-now probe that pings each peer once."""
        answers: dict[int, bool] = {}

        async def reachable(holder: int) -> bool:
            if holder == LOCAL_HOLDER:
                return True
            if holder not in answers:
                key = self.peers.key_of(holder)
                try:
                    if key is None:
                        raise PeerUnavailable("unknown holder")
                    await self.conns.call(key, "Ping", {}, timeout=5)
                    answers[holder] = True
                except (PeerUnavailable, RpcError):
                    answers[holder] = False
            return answers[holder]

        return reachable

    def _redundancy_levels(self) -> tuple[dict[str, int], int, set[bytes]]:
        """Data blocks per redundancy level, bytes of shards still to upload, metadata ids.

        A scan of every block record: run it in a worker thread. Metadata blocks
        are reported apart.
        """
        nodes = self.remount.index.node_ids()
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

    def status(self, scanned: tuple[dict[str, int], int, set[bytes]] | None = None) -> dict:
        """Figures for `fluidfs status` (*scanned*: a result of _redundancy_levels)."""
        levels, pending, nodes = scanned or self._redundancy_levels()
        own = self.shards.used(self.blocks.owner)  # shards of ours kept here (no peers yet)
        order = sorted(levels, key=lambda k: -1 if k == "local" else int(k), reverse=True)
        return {
            "peer_id": self.config.keyring.peer_id,
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
            "upload_rate": self._upload_rate,
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
            "commit": self.remount.status(),
        }

    async def _release_shard_pages(self) -> None:
        """Keep LMDB's mapped shard pages from inflating RSS (see sysutil)."""
        while True:
            await trio.sleep(RELEASE_PAGES_INTERVAL)
            self.shards.release_pages()

    async def _measure_rate(self) -> None:
        """Upload rate for status: exponentially weighted over the last seconds."""
        last = self.blocks.uploaded_bytes
        while True:
            await trio.sleep(1.0)
            now = self.blocks.uploaded_bytes
            self._upload_rate = 0.7 * self._upload_rate + 0.3 * (now - last)
            last = now

    async def serve(self) -> None:
        """Run as a peer with no mount (fluidfs serve) until signalled."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run_services)
                await self._on_signals(nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True):
                self.peers.save_all()
                self.ledger.save_all()
                await trio.to_thread.run_sync(self.meta.sync)
                await trio.to_thread.run_sync(self.shards.sync)

    async def mount(
        self,
        mountpoint: Path,
        *,
        allow_other: bool = False,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Mount at *mountpoint* and serve until unmounted or signalled."""
        await self.start()
        options = set(pyfuse3.default_options)
        options |= {"fsname=" + fsname_for(self.config.state.path), "subtype=fluidfs"}
        if allow_other:
            options.add("allow_other")
        fuse_scope = trio.CancelScope()
        refused: MountError | None = None
        try:
            async with trio.open_nursery() as nursery:
                # Peers first: the writer lease and (on a fresh state) the restored tree
                # must be settled before the mount is usable.
                await nursery.start(self.run_services)
                refused = await self._open_fuse(mountpoint, options)
                if refused is not None:
                    nursery.cancel_scope.cancel()
                    return  # raised below, outside the nursery (no exception group)
                await nursery.start(self.data.run)
                await nursery.start(self.remount.run)
                nursery.start_soon(self._on_signals, fuse_scope)
                if on_ready is not None:
                    on_ready()
                with fuse_scope:
                    await pyfuse3.main()
                # The kernel ended the session (fusermount3 -u) or a signal came.
                self._close_fuse(unmount=fuse_scope.cancel_called)
                await self.stop()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                self._close_fuse(unmount=True)
                await self.stop()
            if refused is not None:
                raise refused
            log.info("unmounted %s", mountpoint)

    async def _open_fuse(self, mountpoint: Path, options: set[str]) -> MountError | None:
        """Settle the lease and the tree (remount.py), then open the FUSE session."""
        try:
            await self.remount.before_mount()
            pyfuse3.init(self.ops, str(mountpoint), options)
        except (RemountError, RuntimeError) as exc:
            with trio.move_on_after(10):
                await self.remount.lease.release()  # if it was taken
            if isinstance(exc, RemountError):
                return MountError(str(exc))
            return MountError(f"cannot mount at {mountpoint}: {exc}")
        self._fuse_open = True
        log.info("mounted %s (peer %s)", mountpoint, self.config.keyring.peer_id)
        return None

    def _close_fuse(self, *, unmount: bool) -> None:
        if self._fuse_open:
            self._fuse_open = False
            try:
                pyfuse3.close(unmount=unmount)
            except Exception:
                log.exception("closing the FUSE session")

    async def _on_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                scope.cancel()
                return
