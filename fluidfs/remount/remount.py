"""Keeping the tree on the network and bringing it back: commits, root records, lease.

This is the node's part that makes "remount anywhere from the keyfile" work:

- at mount: reach the keyfile's peers, take the writer lease (peers/lease.py), find
  the newest valid root record (peers/rootrecord.py) and, on a fresh state directory,
  adopt that commit (fs/restore.py) before the mount is made usable;
- a fresh state directory starts *empty* only when that cannot orphan a backup: a
  quorum of peers must say they hold no root record for this keyfile (``not_found``
  from at least K of them, K = shards needed to rebuild a block, and from no fewer
  than the keyfile lists), or the backup is known to be new (``--new``, or the keyfile
  was created for this state directory: statedir.py ``new-key``). Otherwise the mount
  is refused. One peer saying ``not_found`` proves nothing: it may be new, have lost
  its records, or be someone else answering at a bootstrap address. An empty start
  would commit a tree whose records, once the mount reached the real holders, replace
  the real backup's root there;
- while mounted: commit (fs/commit.py) once changes have been quiet for a while
  (``commit_quiet``, default 30 s; at the latest ``commit_max_delay`` after the first
  change), publish a root record for each commit, renew the lease, load the rest of
  a restored tree in the background, and apply the snapshot retention;
- at unmount: a last commit and the lease released;
- on request (control socket): ``sync``, ``snapshots``, ``forget`` (remount/control.py).

A node without peers has nowhere to back up to: it commits (and so takes
snapshots) only when asked, with ``fluidfs sync``; deleted data then goes at once
as before, instead of being kept by snapshots nobody asked for.

A state directory gets a random machine id (``settings`` table, key
``b"machine_id"``, 16 bytes) the first time it is used: the lease and the root
records say which machine wrote them. Key ``b"origin"`` says how a fresh state
directory settled its tree: ``b"new"`` (started empty: quorum, ``--new`` or a keyfile
made for it; a later mount of the still-empty state skips the quorum) or
``b"restored"`` (adopted a root record).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from fluidfs import control
from fluidfs.fs.commit import (
    DIRTY_KEY,
    INDEX_KEY,
    CommitAborted,
    CommitResult,
    Committer,
    Head,
    wait_placed,
)
from fluidfs.fs.metaformat import Entry, NodeError, decode_node, encode_leaf
from fluidfs.fs.metaindex import Holders, MetaError, MetaIndex
from fluidfs.fs.restore import Restorer
from fluidfs.fs.snapshots import Retention, Snapshot, SnapshotStore, SnapshotView
from fluidfs.fs.tree import ROOT_INO
from fluidfs.keys import BootstrapPeer, derive
from fluidfs.peers.connections import PeerUnavailable
from fluidfs.peers.lease import DEFAULT_RENEW, LeaseHeld, WriterLease
from fluidfs.peers.rootrecord import Found, RecordClient
from fluidfs.remount.control import RemountControl

if TYPE_CHECKING:
    from fluidfs.node.node import Node

log = logging.getLogger(__name__)

CONTEXT_CHUNKING = "fluidfs 2026-11 tree chunking key v1"
MACHINE_KEY = b"machine_id"
ORIGIN_KEY = b"origin"
DIAL_WAIT = 6.0
AUTO_STALL = 2.0  # automatic commits: wait this long without placement progress
STOP_COMMIT_LIMIT = 300.0
AUTO_LIMIT = 30.0  # longest wait for data placement before an automatic commit
REFRESH_INTERVAL = 600.0  # re-commit this often if holders have changed
RETENTION_INTERVAL = 3600.0  # and at least this often anyway, so old snapshots expire
INCOMPLETE_RECHECK = 15.0  # after a commit naming incomplete holders, look again this soon
PUBLISH_RETRY = 10.0


class RemountError(Exception):
    """The mount must not go ahead (lease held elsewhere, stale state, no peer answered)."""


@dataclass
class RemountOptions:
    """Settings for commits, the lease and restore."""

    takeover: bool = False
    retention: Retention = field(default_factory=Retention)
    commit_quiet: float = 30.0
    commit_max_delay: float = 300.0
    refresh_interval: float = REFRESH_INTERVAL
    lease_renew: float = DEFAULT_RENEW
    restore_wait: float = 20.0
    mountpoint: str = ""
    new: bool = False  # --new: a fresh state directory starts a new backup, no quorum
    pinned: list[BootstrapPeer] = field(default_factory=list)  # entries naming a peer id


class Remount:
    """Commits, publishes and restores the tree of one node."""

    def __init__(self, node: Node, options: RemountOptions | None = None) -> None:
        self.node = node
        self.options = options or RemountOptions()
        keyring = node.config.keyring
        self.holders = Holders(keyring.public_key, node.peers.key_of, self._peer_index)
        self.index = MetaIndex(node.meta, node.blocks, self.holders)
        self.machine = self._machine_id()
        self.committer = Committer(
            node.meta,
            node.tree,
            node.data,
            node.blocks,
            self.index,
            self.holders,
            derive(keyring.metadata_key, CONTEXT_CHUNKING),
            self.machine,
        )
        self.snapshots = SnapshotStore(node.meta, node.blocks, self.holders)
        self.restorer = Restorer(node.meta, node.tree, node.blocks, self.index)
        self.view = SnapshotView(
            self.snapshots,
            self.index,
            node.blocks,
            lambda: node.data.block_size,
            lambda: node.tree.get(ROOT_INO),
        )
        self.records = RecordClient(keyring, node.conns, node.peers)
        self.lease = WriterLease(
            self.records,
            self.machine,
            self.options.mountpoint,
            renew=self.options.lease_renew,
            addr_of=lambda: node.conns.listen_addr,
        )
        ops = node.ops
        if hasattr(ops, "restorer"):
            ops.restorer = self.restorer
            ops.view = self.view
            ops.on_change = self.note_change
        self.writer = True
        self.running = False
        self.stopping = False
        self.changed_at: float | None = None
        self.last_change = 0.0
        self.network_seq = 0  # highest root record seq seen on the network
        self.pending_publish: CommitResult | None = None
        self.next_publish = 0.0
        self.refresh_at: float | None = None
        self.force_commit = False
        # BlockStore.holders_version when the last commit read the tree: a refresh that
        # would name the same holders (and change nothing else) is not worth writing.
        self.committed_holders_version = -1
        self.tree_reads = 0  # commits that read and serialised the whole tree
        self.published_to = 0
        self.restored: dict[str, Any] | None = None
        self.dial_errors: dict[str, str] = {}  # bootstrap address -> why it failed
        self.last_error = ""
        self.control = RemountControl(self)
        if self.committer.heads.flag(DIRTY_KEY) is not None:
            self.changed_at = self.last_change = time.monotonic()

    # --- small helpers ---------------------------------------------------------------------

    def _peer_index(self, key: bytes) -> int:
        peer = self.node.peers.get(key)
        return peer.index if peer is not None else self.node.peers.add(key).index

    def _machine_id(self) -> bytes:
        meta = self.node.meta
        with meta.write() as txn:
            raw = txn.get(MACHINE_KEY, db=meta["settings"])
            if raw is None:
                raw = os.urandom(16)
                txn.put(MACHINE_KEY, raw, db=meta["settings"])
        return bytes(raw)

    @property
    def networked(self) -> bool:
        """True when the node has (or is told about) peers."""
        node = self.node
        return (
            node.blocks.remote is not None
            or bool(node.config.bootstrap)
            or bool(self.options.pinned)
        )

    def note_change(self) -> None:
        """The tree changed through the mount (called by the FUSE operations)."""
        now = time.monotonic()
        if self.changed_at is None:
            self.changed_at = now
            self.committer.heads.set_flag(DIRTY_KEY, b"1")
        self.last_change = now

    def _fresh(self) -> bool:
        """A state directory that has never held or committed a tree."""
        if self.committer.heads.latest() is not None:
            return False
        return self.node.tree.is_empty(ROOT_INO) and self.node.blocks.count() == 0

    def _origin(self) -> bytes | None:
        with self.node.meta.read() as txn:
            raw = txn.get(ORIGIN_KEY, db=self.node.meta["settings"])
        return None if raw is None else bytes(raw)

    def _set_origin(self, origin: bytes) -> None:
        with self.node.meta.write() as txn:
            txn.put(ORIGIN_KEY, origin, db=self.node.meta["settings"])

    def _known_new(self) -> bool:
        """This state directory may start empty without asking peers (see the docstring)."""
        config = self.node.config
        return (
            self.options.new
            or self._origin() == b"new"
            or config.state.made_for(config.keyring.peer_id)
        )

    def quorum(self) -> int:
        """``not_found`` answers a fresh state directory needs before it starts empty."""
        keyfile = self.node.config.keyring.keyfile
        return max(keyfile.shards_needed, len(keyfile.peers))

    # --- mounting --------------------------------------------------------------------------

    async def before_mount(self) -> None:
        """Lease, newest root, and restore on a fresh state; raise RemountError to refuse."""
        if self.node.data.dirty:
            self.note_change()  # blocks recovered after a crash are changes to commit
        if not self.networked:
            return
        fresh = self._fresh()
        new = fresh and self._known_new()
        await self._reach_peers()
        try:
            await self.lease.acquire(takeover=self.options.takeover)
        except LeaseHeld as exc:
            raise RemountError(str(exc)) from None
        waiting = fresh and not new
        deadline = time.monotonic() + (self.options.restore_wait if waiting else 0.0)
        while True:
            found = await self.records.newest("root", follow_peers=True)
            if found is not None and (found.exists or not waiting or self._quorate(found)):
                break
            if time.monotonic() >= deadline:
                break
            await trio.sleep(1.0)
            await self._reach_peers()
        if found is not None and found.exists:
            self.network_seq = found.seq
        if fresh:
            if found is not None and found.exists:
                if self.options.new:
                    log.warning("--new, but this keyfile has a backup (commit %d): restoring it",
                                found.seq)
                await self._restore(found)
                self._set_origin(b"restored")
                return
            if not new and (found is None or not self._quorate(found)):
                self._refuse_empty(found)
            self._set_origin(b"new")
            log.info(
                "starting a new backup (%s)",
                "known new"
                if new
                else f"{found.absent} peers said this keyfile has none, {self.quorum()} needed",
            )
            return
        head = self.committer.heads.latest()
        if found is not None and found.exists:
            machine = found.body.get("machine")
            ours = head.seq if head is not None else 0
            if machine != self.machine and found.seq > ours:
                when = time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(found.body.get("time", 0) / 1e9)
                )
                raise RemountError(
                    f"the backup of this keyfile was changed on host {found.body.get('host', '?')} "
                    f"(commit {found.seq} at {when}) after this state directory was last used "
                    f"(commit {ours}); mount with a new --state-dir to get the current tree"
                )

    def _quorate(self, found: Found) -> bool:
        return found.absent >= self.quorum()

    def _refuse_empty(self, found: Found | None) -> None:
        """Raise the RemountError of a fresh state directory that may not start empty."""
        failed = "; ".join(f"{a}: {e}" for a, e in list(self.dial_errors.items())[:4])
        failed = f" ({failed})" if failed else ""
        advice = "or mount with --new if this keyfile is for a new backup"
        if found is None:
            tried = [str(e) for e in self.options.pinned] + list(self.node.config.bootstrap)
            raise RemountError(
                "no peer answered, so fluidfs cannot tell whether this keyfile already has "
                "a backup; mount again once a peer is reachable (tried: "
                f"{', '.join(tried[:8]) or 'no addresses'}){failed}; {advice}"
            )
        raise RemountError(
            f"cannot tell whether this keyfile already has a backup: {found.absent} of the "
            f"{found.answered} peers that answered say it has none, and {self.quorum()} must "
            "before fluidfs starts an empty one (an empty start could replace an existing "
            f"backup){failed}; mount again once more peers are reachable, {advice}"
        )

    async def _reach_peers(self) -> None:
        node = self.node
        live = {key for key, conn in node.conns.conns.items() if not conn.closed}
        connected = {p.addr for p in node.peers if p.key in live}
        targets: list[tuple[str, bytes | None]] = [
            (a, None)
            for a in node.config.bootstrap
            if a != node.conns.listen_addr and a not in connected
        ]
        # Entries naming a peer id are dialled as that peer only: anyone else there is refused.
        targets += [(e.addr, e.key) for e in self.options.pinned if e.key not in live]

        async def one(addr: str, expected: bytes | None) -> None:
            try:
                conn = await node.conns.connect(addr, expected=expected)
            except (PeerUnavailable, ValueError) as exc:
                self.dial_errors[addr] = str(exc).removeprefix(f"{addr}: ")
                return
            self.dial_errors.pop(addr, None)
            if conn.peer_key != node.config.keyring.public_key:
                node.peers.add(conn.peer_key, addr)

        with trio.move_on_after(DIAL_WAIT):
            async with trio.open_nursery() as nursery:
                for addr, expected in targets:
                    nursery.start_soon(one, addr, expected)

    async def _restore(self, found: Found) -> None:
        """Adopt the commit a root record points to (fresh state directory)."""
        body = found.body
        self.records.learn(body.get("peers", []))
        try:
            (pointer,) = decode_node(body["commit"]).entries
            ref = pointer.content
            if ref is None:
                raise NodeError("no commit reference")
        except (KeyError, TypeError, ValueError, NodeError) as exc:
            raise RemountError(f"the newest root record is unusable: {exc}") from None
        node = self.node
        self.holders.learn([ref])
        with node.meta.write() as txn:
            self.index.adopt(txn, ref)  # the head's reference
        try:
            commit = (await self.index.load(ref.block_id)).commit
            if commit is None:
                raise MetaError("the root record does not point to a commit node")
            snaps: list[Entry] = []
            if commit.snaps is not None:
                snaps = await self.index.entries(commit.snaps.block_id)
        except MetaError as exc:
            raise RemountError(f"cannot fetch the committed tree: {exc}") from None
        if commit.block_size != node.data.block_size:
            node.data.block_size = node.block_size = commit.block_size
            with node.meta.write() as txn:
                txn.put(
                    b"block_size", commit.block_size.to_bytes(8, "big"), db=node.meta["settings"]
                )
        tree = commit.root.content.block_id if commit.root.content is not None else None
        head = Head(
            commit.seq,
            ref.block_id,
            commit.time_ns,
            tree,
            commit.snaps.block_id if commit.snaps is not None else None,
            published=True,
        )
        with node.meta.write() as txn:
            self.committer.heads.put(txn, head)
            self.snapshots.replace_all(txn, [Snapshot(e.seq, e) for e in snaps])
            txn.put(INDEX_KEY, b"partial", db=node.meta["commits"])
        self.restorer.adopt_root(commit)
        self.restored = {
            "seq": commit.seq,
            "time": commit.time_ns / 1e9,
            "host": body.get("host", "?"),
            "snapshots": len(snaps),
            "peers_answered": found.answered,
            "peers_holding": found.holding,
        }
        log.info(
            "restored commit %d of %s from %s (%d snapshots; %d peers answered)",
            commit.seq,
            time.ctime(commit.time_ns / 1e9),
            body.get("host", "?"),
            len(snaps),
            found.answered,
        )

    # --- running ---------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background loops while mounted."""
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._commit_loop)
                if self.networked:
                    nursery.start_soon(self._lease_loop)
                if self.restorer.pending() or not self.committer.index_complete():
                    nursery.start_soon(self._background_restore)
                task_status.started()
        finally:
            self.running = False

    async def _commit_loop(self) -> None:
        last_refresh = last_full = time.monotonic()
        while True:
            await trio.sleep(0.25)
            if not self.writer or self.stopping or not self.networked:
                continue  # without peers, commits are taken only on request (fluidfs sync)
            now = time.monotonic()
            try:
                if self.changed_at is not None and (
                    now - self.last_change >= self.options.commit_quiet
                    or now - self.changed_at >= self.options.commit_max_delay
                ):
                    await self.commit(user_changed=True)
                    last_refresh = last_full = now
                elif self.force_commit:
                    self.force_commit = False
                    await self.commit(user_changed=False, force=True)
                elif self.pending_publish is not None and now >= self.next_publish:
                    await self._publish(self.pending_publish)
                elif (self.refresh_at is not None and now >= self.refresh_at) or (
                    now - last_refresh >= self.options.refresh_interval
                ):
                    # Re-serialising the tree costs time in proportion to its size, so
                    # only when some holder changed, or once an hour for retention.
                    last_refresh = now
                    unchanged = (
                        self.node.blocks.holders_version == self.committed_holders_version
                    )
                    if unchanged and now - last_full < RETENTION_INTERVAL:
                        if self.refresh_at is not None:
                            self.refresh_at = now + INCOMPLETE_RECHECK
                        continue
                    self.refresh_at = None
                    last_full = now
                    await self.commit(user_changed=False)
            except (CommitAborted, MetaError) as exc:
                self.last_error = str(exc)
                log.warning("commit put off: %s", exc)
                if self.changed_at is None:
                    self.changed_at = self.last_change = now

    async def _lease_loop(self) -> None:
        while self.writer:
            await trio.sleep(self.options.lease_renew)
            if self.stopping:
                return
            if not await self.lease.check():
                self._lost_lease()

    def _lost_lease(self) -> None:
        self.writer = False
        self.node.ops.read_only = True
        holder = self.lease.lost
        self.last_error = "taken over by " + (holder.where() if holder else "another mount")

    async def _background_restore(self) -> None:
        started = time.monotonic()
        await self.restorer.load_all()
        log.info(
            "loaded %d directories (%d entries) in %.1f s",
            self.restorer.loaded_dirs,
            self.restorer.loaded_entries,
            time.monotonic() - started,
        )
        while not self.committer.index_complete():
            try:
                tops = self.committer.held_nodes()
                fetched = await self.restorer.register_all(tops)
            except MetaError as exc:
                log.warning("rebuilding the index: %s (will retry)", exc)
                await trio.sleep(10.0)
                continue
            self.committer.heads.set_flag(INDEX_KEY, None)
            log.info("index complete: %d more metadata nodes registered", fetched)
            await self.committer.release_old()

    # --- committing and publishing ---------------------------------------------------------

    async def commit(
        self, *, user_changed: bool, stall: float = AUTO_STALL, retention=None, force=False
    ) -> CommitResult | None:
        """Seal, commit and publish; None when there was nothing to commit."""
        if not self.writer:
            raise control.ControlError(f"this mount no longer writes: {self.last_error}")
        if user_changed:
            self.changed_at = None
            self.committer.heads.set_flag(DIRTY_KEY, None)
        try:
            await self.node.data.seal_all()
            await wait_placed(self.node.blocks, None, stall=stall, limit=max(stall, AUTO_LIMIT))
            holders_version = self.node.blocks.holders_version
            self.tree_reads += 1
            result = await self.committer.commit(
                min_seq=self.network_seq,
                snapshots=self.snapshots,
                retention=retention or self.options.retention,
                user_changed=user_changed,
                prune=self.committer.index_complete(),
                force=force,
            )
        except BaseException:
            if user_changed and self.changed_at is None:
                self.changed_at = self.last_change = time.monotonic()
                self.committer.heads.set_flag(DIRTY_KEY, b"1")
            raise
        self.committed_holders_version = holders_version
        if result is None:
            return None
        stats = result.stats
        log.info(
            "commit %d: %d dirs, %d files; %d new metadata nodes (%d bytes, %d on the network), "
            "%d reused, %.2f s%s",
            result.head.seq,
            stats.dirs,
            stats.files,
            stats.nodes_written,
            stats.bytes_written,
            stats.shard_bytes,
            stats.nodes_reused,
            stats.seconds,
            f"; snapshot {result.snapshot}" if result.snapshot else "",
        )
        if stats.incomplete_refs:
            self.refresh_at = time.monotonic() + INCOMPLETE_RECHECK
        await self._publish(result)
        return result

    async def _publish(self, result: CommitResult) -> bool:
        """Publish the root record of *result*; True once enough peers hold it."""
        seq = result.head.seq
        if not self.networked:
            self.pending_publish = None
            await self.committer.mark_published(seq)
            return True
        if result.stats.weak_refs:
            # A fresh machine would find this root and fail to fetch what it names: keep
            # the commit here (its snapshot works) and publish a later, complete one.
            log.warning(
                "commit %d names %d blocks held by fewer than %d peers: root not published yet",
                seq,
                result.stats.weak_refs,
                self.node.codec.needed,
            )
            self.pending_publish = None
            self.refresh_at = time.monotonic() + PUBLISH_RETRY
            return False
        if not await self.lease.check():
            self._lost_lease()
            return False
        body = {
            "time": result.head.time_ns,
            "machine": self.machine,
            "host": socket.gethostname(),
            "commit": encode_leaf([Entry(b"commit", content=result.ref)]),
            "peers": self.records.listing(),
        }
        stored = await self.records.publish("root", seq, body)
        self.published_to = stored
        self.network_seq = max(self.network_seq, seq, self.records.highest.get("root", 0))
        wanted = max(1, min(self.node.codec.needed, len(self.node.ledger)))
        if stored >= wanted:
            self.pending_publish = None
            await self.committer.mark_published(seq)
            return True
        self.pending_publish = result
        self.next_publish = time.monotonic() + PUBLISH_RETRY
        if self.network_seq > seq:
            # Peers hold a root numbered past ours (a mount that lost the lease published
            # before it noticed): commit the same tree again under a higher number.
            log.warning("peers hold root %d, past our %d: committing again", self.network_seq,
                        seq)
            self.pending_publish = None
            self.force_commit = True
        else:
            log.warning("root %d reached %d peers (want %d); will retry", seq, stored, wanted)
        return False

    async def on_stop(self) -> None:
        """At unmount: a last commit of what changed, and the lease given back."""
        self.stopping = True
        if not self.running or not self.writer or not self.networked:
            return
        try:
            with trio.move_on_after(STOP_COMMIT_LIMIT):
                if self.changed_at is not None:
                    await self.commit(user_changed=True)
                elif self.pending_publish is not None:
                    await self._publish(self.pending_publish)
        except (CommitAborted, MetaError, control.ControlError) as exc:
            log.error("last commit failed: %s", exc)
        if self.networked:
            with trio.move_on_after(10.0):
                await self.lease.release()

    # --- control requests ------------------------------------------------------------------

    # --- control requests (remount/control.py) ---------------------------------------------

    async def sync(self, timeout: float) -> dict[str, Any]:
        """fluidfs sync (see RemountControl.sync)."""
        return await self.control.sync(timeout)

    async def forget(self, retention, names: list[str], dry_run: bool) -> dict[str, Any]:
        """fluidfs forget (see RemountControl.forget)."""
        return await self.control.forget(retention, names, dry_run)

    def status(self) -> dict[str, Any]:
        """Figures for `fluidfs status`."""
        return self.control.status()

    def control_handlers(self) -> dict[str, control.Handler]:
        """Control-socket commands: sync, snapshots, forget."""
        return self.control.handlers()
