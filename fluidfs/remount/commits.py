"""Committing the tree while mounted: the commit loop and commits on request.

The loop waits for the next deadline of the schedule (remount/schedule.py) or for an
event that may bring it forward (a first change, peers appearing, a commit result),
and never polls. Each commit seals open data, waits a while for blocks to be placed
(fs/commit.py ``wait_placed``), writes the commit (fs/commit.py) and publishes its
root record (remount/publisher.py). A commit with changes clears the ``dirty`` flag of
the heads table; a failed one sets it again, so a crash before the next commit still
knows there is something to commit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from fluidfs.blocks.blockstore import BlockStore
from fluidfs.fs.commit import DIRTY_KEY, CommitAborted, CommitResult, Committer, wait_placed
from fluidfs.fs.metaindex import MetaError
from fluidfs.fs.snapshots import Retention, SnapshotStore
from fluidfs.remount.leasekeeper import LeaseKeeper
from fluidfs.remount.publisher import Outcome, RootPublisher
from fluidfs.remount.schedule import Action, CommitSchedule
from fluidfs.sysutil import trim_malloc

log = logging.getLogger(__name__)

AUTO_STALL = 2.0  # automatic commits: wait this long without placement progress
AUTO_LIMIT = 30.0  # longest wait for data placement before an automatic commit
STOP_COMMIT_LIMIT = 300.0


class NotWriter(Exception):
    """This mount lost the writer lease: it commits nothing any more."""


class Commits:
    """Takes commits when the schedule says so, and when asked."""

    def __init__(
        self,
        schedule: CommitSchedule,
        committer: Committer,
        snapshots: SnapshotStore,
        blocks: BlockStore,
        publisher: RootPublisher,
        keeper: LeaseKeeper,
        *,
        seal_all: Callable[[], Awaitable[None]],
        retention: Retention,
        networked: Callable[[], bool],
    ) -> None:
        self.schedule = schedule
        self.committer = committer
        self.snapshots = snapshots
        self.blocks = blocks
        self.publisher = publisher
        self.keeper = keeper
        self.seal_all = seal_all
        self.retention = retention
        self.networked = networked
        self.running = False
        self.tree_reads = 0  # commits that read and serialised the whole tree
        self.last_error = ""
        self._wakeup = trio.Event()
        self._told_unpublished = False
        self._publishing = trio.Lock()  # one root record on its way at a time

    # --- events ------------------------------------------------------------------------

    def note_change(self) -> None:
        """The tree changed through the mount (called by the FUSE operations)."""
        if self.schedule.changed(trio.current_time()):
            self.committer.heads.set_flag(DIRTY_KEY, b"1")
            self._wakeup.set()

    def network_changed(self) -> None:
        """Peers appeared (or the node was told of some): automatic commits may start."""
        self.schedule.network(self.networked())
        self._wakeup.set()

    @property
    def changes_pending(self) -> bool:
        """Changes through the mount that no commit has taken yet."""
        return self.schedule.changes_pending

    # --- the loop ----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Commit whenever the schedule says, until cancelled."""
        self.schedule.start(trio.current_time())
        self.schedule.network(self.networked())
        self.running = True
        task_status.started()
        try:
            while True:
                due = self.schedule.next(trio.current_time())
                with trio.move_on_at(due.at if due is not None else float("inf")):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                # The facts the schedule cannot be told of as they happen: look now.
                self.schedule.network(self.networked())
                self.schedule.holders_changed(self.blocks.holders_version)
                if self.keeper.stepping_down:
                    await self.hand_over()
                if not self.keeper.writer and not self.keeper.stepping_down:
                    self._note_unpublished()
                    self.schedule.lease_lost()
                now = trio.current_time()
                due = self.schedule.next(now)
                if due is None or due.at > now:
                    continue
                action = self.schedule.fired(due, now)
                if action is not None:
                    log.debug("commit loop: %s (%s)", action.value, due.reason)
                    await self._act(action)
        finally:
            self.running = False

    async def _act(self, action: Action) -> None:
        try:
            if action is Action.COMMIT_CHANGES:
                await self.commit(user_changed=True)
            elif action is Action.COMMIT_AGAIN:
                await self.commit(user_changed=False, force=True)
            elif action is Action.PUBLISH:
                await self.publish_pending()
            else:
                await self.commit(user_changed=False)
        except NotWriter:
            self.schedule.lease_lost()
        except (CommitAborted, MetaError) as exc:
            self.last_error = str(exc)
            log.warning("commit put off: %s", exc)
            if self.schedule.commit_failed(trio.current_time(), reopen=True):
                self.committer.heads.set_flag(DIRTY_KEY, b"1")

    # --- committing ----------------------------------------------------------------------

    async def commit(
        self,
        *,
        user_changed: bool,
        stall: float = AUTO_STALL,
        retention: Retention | None = None,
        force: bool = False,
        full: bool = False,
    ) -> CommitResult | None:
        """Seal, commit and publish; None when there was nothing to commit. With *full*,
        every directory is read (fs/commit.py), not only those that changed.

        Raises NotWriter once the lease is lost, and CommitAborted or MetaError when the
        commit could not be written (its changes stay due).
        """
        if not self.keeper.may_commit:
            raise NotWriter(f"this mount no longer writes: {self.keeper.lost_reason}")
        self.schedule.commit_started(user_changed=user_changed)
        if user_changed:
            self.committer.heads.set_flag(DIRTY_KEY, None)
        try:
            await self.seal_all()
            await wait_placed(self.blocks, None, stall=stall, limit=max(stall, AUTO_LIMIT))
            holders_version = self.blocks.holders_version
            self.tree_reads += 1
            result = await self.committer.commit(
                min_seq=self.publisher.network_seq,
                snapshots=self.snapshots,
                retention=retention or self.retention,
                user_changed=user_changed,
                prune=self.committer.index_complete(),
                force=force,
                full=full,
            )
        except BaseException:
            if self.schedule.commit_failed(trio.current_time(), reopen=user_changed):
                self.committer.heads.set_flag(DIRTY_KEY, b"1")
            raise
        finally:
            with trio.CancelScope(shield=True):  # the burst's freed heap leaves RssAnon
                await trio.to_thread.run_sync(trim_malloc)
        self.schedule.commit_finished(
            trio.current_time(),
            holders_version=holders_version,
            incomplete=result is not None and bool(result.stats.incomplete_refs),
            user_changed=user_changed,
        )
        self._wakeup.set()
        if result is None:
            return None
        _log_commit(result)
        if await self._publish(result) is Outcome.PUBLISHED:
            # Publishing released old heads' nodes: pages of meta.lmdb the commit did
            # not map (a root not yet taken keeps them, and the retries skip the hop).
            await trio.to_thread.run_sync(self.committer.db.release_pages)
        return result

    async def publish_pending(self) -> None:
        """Send the root record that reached too few peers again, if there is one; a
        publication already on its way is waited for first (a sync that finds nothing
        new to commit reports on the root the mount's own commit is still sending)."""
        async with self._publishing:
            if self.publisher.pending is None:
                self.schedule.published()  # sent meanwhile, by a later commit
                return
            await self._publish_now(self.publisher.pending)

    async def _publish(self, result: CommitResult) -> Outcome:
        async with self._publishing:
            return await self._publish_now(result)

    async def _publish_now(self, result: CommitResult) -> Outcome:
        outcome = await self.publisher.publish(result)
        now = trio.current_time()
        if outcome is Outcome.PUBLISHED:
            self.schedule.published()
        elif outcome is Outcome.SHORT:
            self.schedule.publish_short(now)
        elif outcome is Outcome.WITHHELD:
            self.schedule.publish_withheld(now)
        elif outcome is Outcome.SUPERSEDED:
            self.schedule.publish_superseded(now)
        else:
            self.schedule.lease_lost()
        self._wakeup.set()
        return outcome

    def _note_unpublished(self) -> None:
        """Say once, in the log, that acknowledged writes can no longer be published."""
        if self._told_unpublished:
            return
        if self.schedule.changes_pending or self.publisher.pending is not None:
            self._told_unpublished = True
            log.error("the writer lease was lost with writes acknowledged here and never "
                      "published: they stay readable in this mount and its state directory")

    def lease_changed(self) -> None:
        """The lease was lost or is being handed over: the loop looks at once."""
        self._wakeup.set()

    async def hand_over(self) -> None:
        """Another mount asked for the lease: commit what this mount acknowledged (writes
        stopped already), then release the lease to it, even if the commit failed (it
        then waits no longer; what was not published stays in this state directory)."""
        try:
            with trio.move_on_after(STOP_COMMIT_LIMIT):
                if self.schedule.changes_pending:
                    await self.commit(user_changed=True)
                else:
                    await self.publish_pending()
                if self.publisher.pending is not None:
                    log.error("handing over with commit %d not published",
                              self.publisher.pending.head.seq)
        except (CommitAborted, MetaError, NotWriter) as exc:
            log.error("last commit before the handover failed: %s", exc)
        finally:
            await self.keeper.hand_over()

    async def finish(self) -> None:
        """At unmount: a last commit of what changed (or the pending root sent again)."""
        self.schedule.stop()
        if self.keeper.stepping_down and self.running:
            await self.hand_over()
            return
        if not self.running or not self.keeper.writer or not self.networked():
            return
        try:
            with trio.move_on_after(STOP_COMMIT_LIMIT):
                if self.schedule.changes_pending:
                    await self.commit(user_changed=True)
                else:
                    await self.publish_pending()
        except (CommitAborted, MetaError, NotWriter) as exc:
            log.error("last commit failed: %s", exc)


def _log_commit(result: CommitResult) -> None:
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
