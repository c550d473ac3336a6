"""Bringing a backup's tree onto a fresh state directory, from its newest root record.

At mount, :meth:`TreeRestore.adopt` makes the commit a root record points to the
live one: the head, the snapshot list and the root directory, with everything below
left lazy (fs/restore.py) and the ``index`` flag of the heads table set to
``partial``. While mounted, :meth:`TreeRestore.run` loads the remaining directories
and registers every node of every kept commit, then clears the flag so that older
commits may be released again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from fluidfs.blocks.blockstore import BlockStore, BlockUnavailable
from fluidfs.blocks.record import StoredBlock
from fluidfs.fs.commit import INDEX_KEY, Committer, Head
from fluidfs.fs.metaformat import CommitInfo, Entry, NodeError, Ref, decode_node
from fluidfs.fs.metaindex import Holders, MetaError, MetaIndex
from fluidfs.fs.restore import Restorer
from fluidfs.fs.snapshots import Snapshot, SnapshotStore
from fluidfs.peers.rootrecord import Found, RecordClient
from fluidfs.store.db import Database

log = logging.getLogger(__name__)

INDEX_RETRY = 10.0


class RestoreError(Exception):
    """The root record found cannot be restored from."""


@dataclass(frozen=True)
class Restored:
    """What a mount restored (shown by ``fluidfs status``)."""

    seq: int
    time: float
    host: str
    snapshots: int
    peers_answered: int
    peers_holding: int


@dataclass(frozen=True)
class Fetched:
    """A root record's commit, fetched: its node's reference, the commit, its snapshot list."""

    ref: Ref
    commit: CommitInfo
    snaps: list[Entry]


def commit_ref(body: dict) -> Ref:
    """The reference to the commit node a root record's *body* names; RestoreError if
    it names none."""
    try:
        (pointer,) = decode_node(body["commit"]).entries
        ref = pointer.content
        if ref is None:
            raise NodeError("no commit reference")
    except (KeyError, TypeError, ValueError, NodeError) as exc:
        raise RestoreError(f"the newest root record is unusable: {exc}") from None
    return ref


class TreeRestore:
    """Adopts a committed tree at mount and completes it in the background."""

    def __init__(
        self,
        db: Database,
        records: RecordClient,
        holders: Holders,
        index: MetaIndex,
        committer: Committer,
        snapshots: SnapshotStore,
        restorer: Restorer,
        blocks: BlockStore,
        *,
        adopt_block_size: Callable[[int], None],
    ) -> None:
        self.db = db
        self.records = records
        self.holders = holders
        self.index = index
        self.committer = committer
        self.snapshots = snapshots
        self.restorer = restorer
        self.blocks = blocks
        self.adopt_block_size = adopt_block_size
        self.restored: Restored | None = None

    async def fetch(self, found: Found) -> Fetched:
        """Fetch the commit *found* points to and its snapshot list (the commit node's
        record is made, without a reference: ``adopt`` takes the head's); RestoreError if
        that fails."""
        self.records.learn_root(found.body)
        ref = commit_ref(found.body)
        self.holders.learn([ref])
        with self.db.write() as txn:
            self.index.adopt(txn, ref, refs=0)
        try:
            commit = (await self.index.load(ref.block_id)).commit
            if commit is None:
                raise MetaError("the root record does not point to a commit node")
            snaps: list[Entry] = []
            if commit.snaps is not None:
                snaps = await self.index.entries(commit.snaps.block_id)
        except MetaError as exc:
            raise RestoreError(f"cannot fetch the committed tree: {exc}") from None
        return Fetched(ref, commit, snaps)

    async def warm(self, found: Found) -> None:
        """Rebuild into memory the blocks ``fetch`` and the first listing read: the
        commit node *found* points to, then its snapshot list's and its root
        directory's top nodes, at once. Nothing is written to the state directory, so
        this may run before the mount may write (while the lease is being taken) and
        come to nothing: the root finally adopted may be another. Failures are left
        for ``fetch`` to report."""
        try:
            ref = commit_ref(found.body)
            self.holders.learn([ref])
            commit = decode_node(await self._rebuild(ref)).commit
            if commit is None:
                return
            tops = [r for r in (commit.snaps, commit.root.content) if r is not None]
            async with trio.open_nursery() as nursery:
                for top in tops:
                    self.holders.learn([top])
                    nursery.start_soon(self._rebuild, top)
        except (RestoreError, NodeError, BlockUnavailable) as exc:
            log.debug("warming the restored tree's first blocks: %s", exc)

    async def _rebuild(self, ref: Ref) -> bytes:
        """The block of *ref* rebuilt from its holders and held in memory (the block
        store's ``recent``), with no record of it made."""
        stored = StoredBlock(ref.record, 0, self.holders.local(ref))
        data = await self.blocks.rebuild(stored)
        self.blocks.recent.keep(ref.block_id, data)
        return data

    async def adopt(self, found: Found, fetched: Fetched | None = None) -> Restored:
        """Adopt the commit *found* points to (fresh state directory, or one that gave up
        its own tree: remount/conflicts.py), as *fetched* already if given; RestoreError
        if it cannot be fetched."""
        if fetched is None:
            fetched = await self.fetch(found)
        body = found.body
        commit, snaps = fetched.commit, fetched.snaps
        with self.db.write() as txn:
            self.index.adopt(txn, fetched.ref)  # the head's reference
        self.adopt_block_size(commit.block_size)
        tree = commit.root.content.block_id if commit.root.content is not None else None
        head = Head(
            commit.seq,
            fetched.ref.block_id,
            commit.time_ns,
            tree,
            commit.snaps.block_id if commit.snaps is not None else None,
            published=True,
        )
        with self.db.write() as txn:
            self.committer.heads.put(txn, head)
            self.snapshots.replace_all(txn, [Snapshot(e.seq, e) for e in snaps])
            txn.put(INDEX_KEY, b"partial", db=self.db["commits"])
        self.restorer.adopt_root(commit)
        self.restored = Restored(
            seq=commit.seq,
            time=commit.time_ns / 1e9,
            host=body.get("host", "?"),
            snapshots=len(snaps),
            peers_answered=found.answered,
            peers_holding=found.holding,
        )
        log.info(
            "restored commit %d of %s from %s (%d snapshots; %d peers answered)",
            commit.seq,
            time.ctime(commit.time_ns / 1e9),
            body.get("host", "?"),
            len(snaps),
            found.answered,
        )
        return self.restored

    @property
    def unfinished(self) -> bool:
        """Directories still lazy, or the index of kept commits not rebuilt yet."""
        return bool(self.restorer.pending()) or not self.committer.index_complete()

    async def run(self) -> None:
        """Load every lazy directory, then register every kept node (retrying on errors)."""
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
                await trio.sleep(INDEX_RETRY)
                continue
            self.committer.heads.set_flag(INDEX_KEY, None)
            log.info("index complete: %d more metadata nodes registered", fetched)
            await self.committer.release_old()
