"""The node: the composition root that builds the parts over one state directory.

It constructs every collaborator and hands each what it needs, in dependency order:
storage (meta.lmdb, shards, block store, tree, file data), the peer side (peer
list, ledger, peer service, connections, manager, discovery, remote shards, repair,
audit, lifecycle), the remount part (commits, publishing, the lease gate, restore),
then the FUSE operations and the session. What each part does is in its own module;
here are only the wiring, the order things start and stop in, and crash recovery.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import trio

from fluidfs import control, keysaved
from fluidfs.blocks.audit import Auditor
from fluidfs.blocks.blockstore import BlockStore
from fluidfs.blocks.cache import BlockCache
from fluidfs.blocks.codec import BlockCodec
from fluidfs.blocks.migrate import Migrator
from fluidfs.blocks.provider_repairs import ProviderRepairs
from fluidfs.blocks.reconcile import ReconcilePolicy, Reconciler
from fluidfs.blocks.remote import RemoteShards
from fluidfs.blocks.repair import Repairer
from fluidfs.diskspace import DiskReserve, is_disk_full
from fluidfs.fs.commit import DIRTY_KEY, Committer
from fluidfs.fs.filedata import FileData
from fluidfs.fs.inode import Inode, now_ns
from fluidfs.fs.layered import LayeredOperations
from fluidfs.fs.metaindex import Holders, MetaIndex
from fluidfs.fs.restore import Restorer
from fluidfs.fs.snapshots import SnapshotStore, SnapshotView
from fluidfs.fs.tree import ROOT_INO, Tree
from fluidfs.keys import derive, encode_peer_id
from fluidfs.net.bandwidth import Bandwidth
from fluidfs.net.errors import RpcError
from fluidfs.node.config import NodeConfig
from fluidfs.node.handlers import node_handlers
from fluidfs.node.invite import invite_handlers
from fluidfs.node.session import FuseSession, MountError, cancel_on_signals
from fluidfs.node.status import NodeStatus, UploadRate
from fluidfs.node.supervise import supervise
from fluidfs.node.traffic import TrafficRate
from fluidfs.peers.addrrecord import AddressBook
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable, split_addr
from fluidfs.peers.departure import Departure
from fluidfs.peers.discovery import Discovery, DiscoveryPolicy
from fluidfs.peers.handover import switch_providers
from fluidfs.peers.homecoming import Homecoming, LocalSide, leave_provider
from fluidfs.peers.lease import WriterLease
from fluidfs.peers.lifecycle import Lifecycle
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.portmap import PortMapper
from fluidfs.peers.provider import ProviderClient
from fluidfs.peers.reach import Reachability
from fluidfs.peers.relay import RelayServer
from fluidfs.peers.relayclient import RelayClient, RelayClientPolicy, relay_candidates
from fluidfs.peers.rootrecord import RecordClient
from fluidfs.peers.sides import ProviderSides
from fluidfs.remount import control as remount_control
from fluidfs.remount.commits import Commits
from fluidfs.remount.conflicts import Conflicts
from fluidfs.remount.dialer import PeerDialer
from fluidfs.remount.gate import MountGate, quorum
from fluidfs.remount.leasekeeper import LeaseKeeper
from fluidfs.remount.options import RemountError
from fluidfs.remount.publisher import RootPublisher
from fluidfs.remount.restore import TreeRestore
from fluidfs.remount.schedule import CommitSchedule
from fluidfs.service.customer_repair import CustomerRepairer
from fluidfs.service.faults import NO_FAULTS, FaultInjection
from fluidfs.service.host import PeerService
from fluidfs.statedir import fsname_for
from fluidfs.store.accounts import AccountBook
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.records import RecordStore
from fluidfs.store.settings import StateSettings
from fluidfs.store.shards import ShardStore

__all__ = ["MountError", "Node", "NodeConfig"]

log = logging.getLogger(__name__)

SYNC_INTERVAL = 30.0
SAVE_INTERVAL = 5.0
UPLOAD_DRAIN_SECONDS = 120.0
LEAVE_PROVIDER_SECONDS = 30.0  # unmount waits this long for the provider to take over
RELEASE_PAGES_INTERVAL = 0.5
META_RELEASE_INTERVAL = 10.0  # seconds between giving back meta.lmdb's mapped pages
PEER_WORKER_THREADS = 2  # the peer service's own limiter (docs/protocol.md §5)
CONTEXT_CHUNKING = "fluidfs 2026-11 tree chunking key v1"  # commits' chunk-boundary key


class Node:
    """A fluidfs node: metadata, blockstore and filesystem over one state directory."""

    def __init__(self, config: NodeConfig, faults: FaultInjection = NO_FAULTS) -> None:
        self.config = config
        keyring = config.keyring
        config.state.lock(keyring.peer_id)
        self.meta = Database(config.state.meta, META_TABLES, compacting=True)
        self.settings = StateSettings(self.meta)
        self.shards = ShardStore(config.state.shards)
        # The state disk's metadata reserve: every data write claims from it, our own
        # (blocks, cache, dirty files) and peers' (shards, records) alike (diskspace.py).
        self.reserve = DiskReserve(config.state.path)
        self.limiter = trio.CapacityLimiter(config.worker_threads)
        self.codec = BlockCodec(
            dedup_key=keyring.dedup_key,
            wrap_key=keyring.wrap_key,
            needed=keyring.keyfile.shards_needed,
            total=keyring.keyfile.shards_total,
        )
        self.cache = BlockCache(config.state.cache, config.cache_size, lambda _bid: True)
        self.blocks = BlockStore(
            self.meta, self.shards, self.codec, self.cache, keyring.public_key, self.limiter,
            reserve=self.reserve,
        )
        self.tree = Tree(self.meta)
        block_size = self.settings.settle_block_size(config.block_size)
        self.data = FileData(self.tree, self.blocks, config.state.dirty, block_size, self.limiter)
        self._ensure_root()
        self._wire_peers(faults)
        self._wire_remount()
        self.ops = LayeredOperations(
            self.tree,
            self.data,
            str(config.state.path),
            restorer=self.restorer,
            view=self.view,
            on_change=self.commits.note_change,
            may_write=self.keeper.may_write,
        )
        self.session = FuseSession(self.ops, fsname_for(config.state.path), keyring.peer_id)
        self.upload_rate = UploadRate(self.blocks)
        self.traffic = TrafficRate(self.conns.bandwidth)
        self.status = NodeStatus(
            keyring.peer_id,
            self.meta,
            self.blocks,
            self.codec,
            self.shards,
            self.data,
            self.conns,
            self.peers,
            self.ledger,
            self.service,
            self.repairer,
            self.migrator,
            self.auditor,
            self.upload_rate,
            metadata_ids=self.index.node_ids,
            commit_status=self.remount_requests.status,
            state_path=config.state.path,
            keyfile_saved=lambda: keysaved.saved_at(config.state.path) is not None,
            traffic=self.traffic,
            tolerance=config.lifecycle.tolerance,
            grouped=not config.even_placement,
            fuse_requests=lambda: dict(self.ops.requests),
            fuse_loop=self.session.loop.figures,
        )
        self._stopped = False
        self.web_up = trio.Event()  # the page's address is published (or it failed to bind)
        # The mount is open: a page started beside it may load its stack now.
        self.mount_open = trio.Event()

    # --- wiring ----------------------------------------------------------------------------

    def _wire_peers(self, faults: FaultInjection) -> None:
        config, keyring = self.config, self.config.keyring
        self.peers = PeerList(self.meta, keyring.public_key, config.trust)
        self.ledger = Ledger(self.meta)
        self.sides = ProviderSides(self.ledger)  # where partners' sides are (peers/sides.py)
        records = RecordStore(config.state.path / "records", reserve=self.reserve)
        self.addresses = AddressBook()  # peers' signed address records (peers/addrrecord.py)
        self.relay = None if config.relay is None else RelayServer(config.relay, self._relay_ask)
        relay_ops = self.relay.ops() if self.relay is not None else {}
        # the client is made with the pool below (it may learn relays: always answers)
        relay_ops["RelayIncoming"] = lambda key, args: self.relay_client.incoming(key, args)
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
            faults=faults,
            cooldown=config.lifecycle.cooldown,
            addresses=self.addresses,
            remote_of=lambda key: self.conns.remote.get(key, ""),
            accounts=AccountBook(self.meta) if config.provider else None,
            keep=config.lifecycle.keep,
            proposes_only=config.use_provider is not None,
            relay_ops=relay_ops,
            reserve=self.reserve,
        )
        self.conns = Connections(
            keyring.signing_key,
            self.service,
            self.peers,
            limits=config.net_limits,
            is_partner=self.service.is_partner,
            store_at=self.sides.store_at_of,
            bandwidth=Bandwidth.limits(config.limit_upload, config.limit_download),
            relay=self.relay,
            via_of=self._relays_of,
        )
        self.relay_client = RelayClient(
            self.conns,
            config.relay_client or RelayClientPolicy(relays=config.relay_via),
            unreachable=lambda: self.reach.direct == [],  # checked, and nobody can dial us
            candidates=lambda: relay_candidates(self.peers, self.addresses),
            on_change=lambda: self.reach.wake(),
        )
        self.provider: ProviderClient | None = None  # ours, if we use one (mount --provider)
        if config.use_provider is not None:
            self.provider = ProviderClient(self.conns, self.ledger, *config.use_provider,
                                           tick=config.lifecycle.tick,
                                           give_up=config.lifecycle.tolerance / 2)
        self.manager = PeerManager(
            self.conns,
            self.peers,
            self.ledger,
            donate=config.donate,
            agreement_size=config.donate // (2 * keyring.keyfile.shards_total),
            term=config.term,
            propose=config.stores_data,
            on_new_agreement=self._new_agreement,
            provider=self.provider,
        )
        # Mounted without --provider after having one: our side comes home (homecoming.py);
        # with one, the side held here goes to it (departure.py).
        self.homecoming: Homecoming | None = None
        self.departure: Departure | None = None
        home = LocalSide(self.shards, self.ledger, config.donate, keyring.public_key,
                         self.limiter, records, self.reserve)
        if self.provider is not None:
            self.departure = Departure(self.conns, self.ledger, home, self.provider,
                                       self.manager.move_to_provider,
                                       tick=config.lifecycle.tick)
        if config.use_provider is None and (left := self.settings.provider()) is not None:
            self.homecoming = Homecoming(self.conns, self.ledger, home, left,
                                         self.manager.take_back, tick=config.lifecycle.tick,
                                         give_up=config.lifecycle.tolerance / 2)
        policy = config.discovery or DiscoveryPolicy(target=2 * keyring.keyfile.shards_total)
        self.discovery = Discovery(self.conns, self.peers, self.ledger, self.manager, policy,
                                   self.addresses, wants_relays=self.relay_client.wants_relays)
        self.portmap = PortMapper(lambda: self.conns.listen_addr, config.portmap)
        self.reach = Reachability(self.conns, self.peers, self.ledger, keyring.signing_key,
                                  config.reach, mapped=lambda: self.portmap.mapped,
                                  relays=self.relay_client.via,
                                  offers_relay=self.relay is not None,
                                  book=self.addresses)
        self.remote = RemoteShards(
            self.conns,
            self.peers,
            self.ledger,
            self.codec,
            self.limiter,
            even_placement=config.even_placement,
            on_liar=self._liar_caught,
        )
        self.migrator = Migrator(self.blocks)
        # Repair a block once its live shards fall to the threshold (default N-1: any loss).
        threshold = config.repair_threshold or keyring.keyfile.shards_total - 1
        self.blocks.total_missing_allowed = max(0, keyring.keyfile.shards_total - threshold - 1)
        self.auditor = Auditor(self.blocks, self.remote, config.audit)
        self.repairer = Repairer(self.blocks, config.repair)
        # Reconcile with hosts once a tolerance period (a day by default): what they keep
        # for us beyond what we reference is deleted. Only the writer; see _run_remount.
        self.reconciler = Reconciler(
            self.blocks, self.remote, ReconcilePolicy(interval=config.lifecycle.tolerance),
            may_run=lambda: self.keeper.writer,
        )
        self.lifecycle = Lifecycle(
            self.conns, self.ledger, self.shards, self.limiter, config.lifecycle,
            on_end=self._agreement_ended, records=records,
        )
        # Provider-side repair (issue 13 item 4): ours at our provider, or, as a provider,
        # the one we run for away customers.
        self.provider_repairs: ProviderRepairs | None = None
        if config.use_provider is not None and config.provider_repairs:
            provider_id, provider_addr = config.use_provider
            self.provider_repairs = ProviderRepairs(
                self.conns, provider_id, keyring.public_key, provider_addr,
                keyring.signing_key, self.blocks, self.peers, self.ledger,
                tick=config.lifecycle.tick)
        self.customer_repairer: CustomerRepairer | None = None
        if self.service.repair_book is not None:
            self.customer_repairer = CustomerRepairer(
                self.service.repair_book, self.conns, keyring.signing_key, self.limiter,
                config.customer_repairs)
        if config.bootstrap or len(self.ledger):
            self.blocks.use_network(self.remote)

    def _wire_remount(self) -> None:
        """Commits, root records, the lease gate and restore (fluidfs/remount/)."""
        config, keyring, options = self.config, self.config.keyring, self.config.remount
        machine = self.settings.machine_id()
        self.holders = Holders(keyring.public_key, self.peers.key_of, self._peer_index)
        self.index = MetaIndex(self.meta, self.blocks, self.holders)
        self.committer = Committer(
            self.meta,
            self.tree,
            self.data,
            self.blocks,
            self.index,
            self.holders,
            derive(keyring.metadata_key, CONTEXT_CHUNKING),
            machine,
        )
        self.snapshots = SnapshotStore(self.meta, self.blocks, self.holders)
        self.restorer = Restorer(self.meta, self.tree, self.blocks, self.index)
        self.view = SnapshotView(
            self.snapshots,
            self.index,
            self.blocks,
            lambda: self.data.block_size,
            lambda: self.tree.get(ROOT_INO),
        )
        records = RecordClient(keyring, self.conns, self.peers, sides=self.sides)
        lease = WriterLease(
            records,
            machine,
            options.mountpoint,
            renew=options.lease_renew,
            addr_of=lambda: self.conns.listen_addr,
            partners=lambda: [a.peer for a in self.ledger.active()],
        )
        self.keeper = LeaseKeeper(lease, on_lost=self._lease_lost)
        self.publisher = RootPublisher(
            records,
            self.committer,
            self.keeper,
            machine,
            needed=self.codec.needed,
            partners=lambda: len(self.ledger),
            networked=self.networked,
        )
        self.commits = Commits(
            CommitSchedule(
                options.schedule(),
                automatic=self.networked(),
                dirty=self.committer.heads.flag(DIRTY_KEY) is not None,  # left by a crash
            ),
            self.committer,
            self.snapshots,
            self.blocks,
            self.publisher,
            self.keeper,
            seal_all=self.data.seal_all,
            retention=options.retention,
            networked=self.networked,
        )
        self.tree_restore = TreeRestore(
            self.meta,
            records,
            self.holders,
            self.index,
            self.committer,
            self.snapshots,
            self.restorer,
            self.blocks,
            adopt_block_size=self._adopt_block_size,
        )
        self.conflicts = Conflicts(
            config.state.path / "conflicts",
            self.tree,
            self.data,
            self.index,
            self.committer,
            self.restorer,
            self.tree_restore,
            self.snapshots,
            on_change=self.commits.note_change,
        )
        keyfile = keyring.keyfile
        self.gate = MountGate(
            options,
            PeerDialer(self.conns, self.peers, keyring.public_key, config.bootstrap,
                       options.pinned),
            self.keeper,
            records,
            self.publisher,
            self.tree_restore,
            self.settings,
            self.committer.heads,
            self.tree,
            self.blocks,
            self.conflicts,
            machine=machine,
            quorum=quorum(keyfile.shards_needed, len(keyfile.peers)),
            made_for_state=config.state.made_for(keyring.peer_id),
            networked=self.networked,
        )
        self.remount_requests = remount_control.RemountRequests(
            self.commits,
            self.publisher,
            self.committer,
            self.snapshots,
            self.index,
            self.restorer,
            self.tree_restore,
            self.keeper,
            self.blocks,
            conflicts=self.conflicts.present,
            settle=self.migrator.settle,
            retention=options.retention,
            networked=self.networked,
        )

    # --- what the parts are told of each other -------------------------------------------------

    def networked(self) -> bool:
        """True when the node has (or is told about) peers to back up to."""
        return (
            self.blocks.remote is not None
            or bool(self.config.bootstrap)
            or bool(self.config.remount.pinned)
        )

    def _peer_index(self, key: bytes) -> int:
        peer = self.peers.get(key)
        return peer.index if peer is not None else self.peers.add(key).index

    def _new_agreement(self, _key: bytes) -> None:
        """Shards can go to peers now; blocks kept only here can start moving there."""
        self.blocks.use_network(self.remote)
        self.migrator.wake()
        self.commits.network_changed()

    def _agreement_ended(self, key: bytes) -> None:
        """Our shards on that peer no longer count: repair takes over (the repairer
        forgets the holder in every block record in the background, then repairs)."""
        peer = self.peers.get(key)
        if peer is not None:
            self.repairer.holder_gone(peer.index, encode_peer_id(key)[:12])

    def _liar_caught(self, key: bytes) -> None:
        """A holder served a corrupt shard: its agreement ends now (suspects.py has
        counted its shards lost and marked it caught)."""
        self.lifecycle.end(key, "served a corrupt shard")

    def _lease_lost(self) -> None:
        """Another mount writes now (or asked to): this one turns read-only, and the commit
        loop looks (a handover's last commit)."""
        self.ops.read_only = True
        self.commits.lease_changed()

    def _adopt_block_size(self, block_size: int) -> None:
        """A restored backup's block size replaces the one this fresh state started with."""
        if block_size != self.data.block_size:
            self.data.adopt_block_size(block_size)
            self.settings.set_block_size(block_size)

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

    # --- starting and stopping -------------------------------------------------------------

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
        """Seal everything, commit, give uploads a while to finish, and flush to disk."""
        if self._stopped:
            return
        self._stopped = True
        with trio.CancelScope(shield=True):
            self.keeper.stop()
            await self.data.seal_all()
            try:
                await self.commits.finish()
            except Exception as exc:
                if not is_disk_full(exc, self.config.state.path):
                    raise
                log.error("no commit at unmount: the disk holding the state directory is full")
            await self.keeper.release()
            with trio.move_on_after(UPLOAD_DRAIN_SECONDS):
                await self.blocks.drain()
            if self.provider_repairs is not None:
                await self._leave_provider_repairs()
            self.peers.save_all()
            self.ledger.save_all()
            self.meta.commit_batch()
            await self.blocks.make_durable()  # blocks still unplaced: their only copy
            await trio.to_thread.run_sync(self.meta.sync)
            await trio.to_thread.run_sync(self.shards.sync)

    async def _leave_provider_repairs(self) -> None:
        """Hand the provider our capabilities as they are now and say we go away; a
        provider that does not answer in time repairs once we stop refreshing the grant."""
        assert self.provider_repairs is not None
        with trio.move_on_after(LEAVE_PROVIDER_SECONDS):
            try:
                await self.provider_repairs.leave()
                log.info("the provider repairs our blocks while we are away")
            except (PeerUnavailable, RpcError) as exc:
                log.warning("could not tell the provider we go away: %s", exc)

    def close(self) -> None:
        """Close the databases and release the state lock."""
        self.meta.close()
        self.shards.close()
        self.config.state.unlock()

    # --- running ---------------------------------------------------------------------------

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

    async def _relay_ask(self, target: bytes, token: bytes) -> None:
        """As a relay: tell a registered peer to call back for *token* (peers/relay.py)."""
        await self.conns.call(target, "RelayIncoming", {"token": token}, timeout=10)

    def _relays_of(self, key: bytes) -> list[str]:
        """The relays a peer's newest address record says it can be reached through."""
        record = self.addresses.get(key)
        return [str(a) for a in record.via] if record is not None else []

    async def run_services(
        self, *, web_beside: bool = False, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the peer service, control socket and background loops until cancelled.
        With *web_beside* the page starts in the background once the mount is open
        (``mount_open``; ``web_up`` says when its address is out) instead of before this
        reports started."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.conns.run)
            if self.config.listen:
                host, port = split_addr(self.config.listen)
                await nursery.start(self.conns.serve, host, port)
                self.config.state.publish("listen", self.conns.listen_addr + "\n")
                log.info("peer service listening on %s", self.conns.listen_addr)
            await nursery.start(control.serve, self.config.state.control, self.control_handlers())
            if self.config.web and web_beside:
                nursery.start_soon(self._run_web_beside)
            elif self.config.web:
                await nursery.start(self._run_web)
                self.web_up.set()
            await nursery.start(self.blocks.run)
            await nursery.start(self.remote.run)
            # Each loop is supervised: whatever it raises is logged and it is restarted
            # with back-off, so no failure in one can end the node (fluidfs/node/supervise.py).
            for name, loop in [
                ("sync timer", self._sync_timer),
                ("reconnect", self.manager.reconnect_known),
                ("discovery", self.discovery.run),
                ("reachability", self.reach.run),
                ("port mapping", self.portmap.run),
                ("relay registrations", self.relay_client.run),
                ("auditor", self.auditor.run),
                ("repairer", self.repairer.run),
                ("migrator", self.migrator.run),
                ("lifecycle", self.lifecycle.run),
                ("upload rate", self.upload_rate.run),
                ("traffic rate", self.traffic.run),
                ("shard pages", self._release_shard_pages),
                ("metadata pages", self._release_meta_pages),
            ]:
                nursery.start_soon(supervise, name, loop)
            if self.service.provider is not None:
                tick = self.config.lifecycle.tick
                nursery.start_soon(supervise, "reservations", self.service.provider.run, tick)
            if self.provider is not None:
                nursery.start_soon(supervise, "provider", self.provider.run,
                                   self.manager.take_back)
                nursery.start_soon(supervise, "provider switch", switch_providers,
                                   self.settings, self.conns, self.ledger, self.provider,
                                   self.manager.move_to_provider)
            if self.departure is not None:
                nursery.start_soon(supervise, "joining the provider", self.departure.run)
            if self.homecoming is not None:
                nursery.start_soon(supervise, "leaving the provider", leave_provider,
                                   self.settings, self.homecoming)
            if self.provider_repairs is not None:
                nursery.start_soon(supervise, "provider repairs", self.provider_repairs.run)
            if self.customer_repairer is not None:
                nursery.start_soon(supervise, "repairs for customers",
                                   self.customer_repairer.run)
            for addr in self.config.bootstrap:
                nursery.start_soon(supervise, f"bootstrap {addr}", self.manager.bootstrap, addr)
            task_status.started()

    def control_handlers(self) -> dict[str, control.Handler]:
        """Everything the control socket answers: the node's requests and the remount's."""
        handlers = node_handlers(
            self.peers,
            self.ledger,
            self.shards,
            self.manager,
            self.conns,
            self.tree,
            self.blocks,
            self.status,
        )
        for part in (self.provider, self.service.provider,  # ours; the one we are
                     self.homecoming,  # the one we leave
                     self.provider_repairs, self.customer_repairer):
            if part is not None:
                handlers["status"] = part.with_status(handlers["status"])
        if self.service.provider is not None:  # its customers, in `fluidfs peers`
            handlers["peers"] = self.service.provider.with_peers(handlers["peers"])
        return (
            handlers
            | invite_handlers(self.reach, self.manager, self.addresses)
            | remount_control.handlers(self.remount_requests)
        )

    async def _run_web_beside(self) -> None:
        """The page, started once the mount is open: its socket is bound and its
        address published at once (``web_up``: `fluidfs mount` prints the address and
        returns), then its stack (Starlette, Hypercorn, h2, segno), a quarter of a
        CPU-second to import and more from a cold disk, loads in a worker thread and
        serves on that socket. Imported beside the gate, it held the GIL against the
        gate's own work; waited for before `fluidfs mount` returned, it was most of
        what a fresh mount's `mount && ls` waited for after the tree was there (issue
        16). A page that cannot bind or start is logged and never stops the mount."""
        from fluidfs.web.listen import bind_page, unpublish
        from fluidfs.web.token import load_or_create

        try:
            await self.mount_open.wait()
            load_or_create(self.config.state.path)  # the address printed carries it
            sock = bind_page(self.config.web, self.config.state.path)
            if sock is None:
                return
            try:
                self.web_up.set()
                await trio.to_thread.run_sync(importlib.import_module, "fluidfs.web.site")
                await self._run_web(sock=sock)
            finally:
                sock.close()
                unpublish(self.config.state.path)
        finally:
            self.web_up.set()

    async def _run_web(
        self, *, sock: socket.socket | None = None, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """The status and restore page (fluidfs/web/, docs/web.md) on config.web (on
        *sock*, bound to it already, if given)."""
        # Lazy: the web stack (Starlette, Hypercorn, segno) loads only where a page runs,
        # not in every `fluidfs serve` peer.
        from fluidfs.fs.snapcopy import invalidate_entry
        from fluidfs.keys import dumps
        from fluidfs.web.site import Page

        def invalidate(parent: int, name: bytes) -> None:
            if self.session.is_open:
                invalidate_entry(parent, name)

        page = Page(
            self.config.web,
            self.config.state.path,
            self.control_handlers(),
            self.view,
            self.ops,
            lambda: dumps(self.config.keyring.keyfile),
            self.config.web_refresh,
            invalidate,
        )
        await page.run(sock=sock, task_status=task_status)

    async def _release_shard_pages(self) -> None:
        """Keep LMDB's mapped shard pages from inflating RSS (see sysutil)."""
        while True:
            await trio.sleep(RELEASE_PAGES_INTERVAL)
            await trio.to_thread.run_sync(self.shards.release_pages, limiter=self.limiter)

    async def _release_meta_pages(self) -> None:
        """Give back meta.lmdb's mapped pages now and then (see sysutil): the hot ones
        fault back in from the page cache at once, the cold ones stop counting in RSS."""
        while True:
            await trio.sleep(META_RELEASE_INTERVAL)
            await trio.to_thread.run_sync(self.meta.release_pages, limiter=self.limiter)

    async def _run_remount(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """While mounted: the commit loop, lease renewals and the rest of a restore."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.commits.run)
            if self.networked():
                nursery.start_soon(self.keeper.run)
            nursery.start_soon(supervise, "reconciler", self.reconciler.run)
            # idle unless directories are lazy (a restored tree)
            nursery.start_soon(supervise, "prefetch", self.restorer.prefetch)
            if self.tree_restore.unfinished:
                nursery.start_soon(self.tree_restore.run)
            task_status.started()

    async def _settle_before_mount(self, on_progress: Callable[[str], None]) -> None:
        """The lease gate (remount/gate.py); its refusal becomes a MountError."""
        try:
            await self.gate.before_mount(on_progress=on_progress)
        except RemountError as exc:
            raise MountError(str(exc)) from None

    async def _ready_once_web_up(
        self, on_ready: Callable[[], None] | None, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Started once the mount is open: say the mount is ready once the page's
        socket is bound and its address published (`fluidfs mount` prints it then); the
        page loads its stack and serves on that socket afterwards."""
        self.mount_open.set()
        task_status.started()
        if self.config.web:
            await self.web_up.wait()
        if on_ready is not None:
            on_ready()

    async def serve(self) -> None:
        """Run as a peer with no mount (fluidfs serve) until signalled."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run_services)
                await cancel_on_signals(nursery.cancel_scope)
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
        on_progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        """Mount at *mountpoint* and serve until unmounted or signalled (node/session.py);
        *on_progress* is told what the mount waits for (the writer lease's countdown)."""
        await self.start()
        if self.data.dirty:
            self.commits.note_change()  # blocks recovered after a crash are changes to commit
        await self.session.run(
            mountpoint,
            allow_other=allow_other,
            services=functools.partial(self.run_services, web_beside=True),
            prepare=functools.partial(self._settle_before_mount, on_progress),
            abandon=self.keeper.release,
            background=[self.data.run, self.meta.batch.run, self._run_remount,
                        functools.partial(self._ready_once_web_up, on_ready)],
            stop=self.stop,
        )
