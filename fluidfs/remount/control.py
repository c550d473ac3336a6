"""What `fluidfs sync`, `snapshots`, `forget` and `status` ask of the remount part.

:class:`RemountRequests` answers in domain terms (each answer a JSON-able dict) and
raises domain errors; :func:`handlers` is the edge to the control socket (control.py,
protocol version 1), the one place those errors become ``ControlError`` replies.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from fluidfs import control
from fluidfs.blocks.blockstore import BlockStore
from fluidfs.fs.commit import CommitStats, Committer, wait_placed
from fluidfs.fs.metaindex import MetaIndex
from fluidfs.fs.restore import Restorer
from fluidfs.fs.snapshots import Retention, SnapshotStore
from fluidfs.remount.commits import Commits, NotWriter
from fluidfs.remount.leasekeeper import LeaseKeeper
from fluidfs.remount.publisher import RootPublisher
from fluidfs.remount.restore import TreeRestore

SYNC_STALL = 20.0  # fluidfs sync: seconds without placement progress before reporting
SYNC_ROUNDS = 3  # commits again while holders improve after the tree was written
PUBLISH_RETRY = 2.0  # fluidfs sync: seconds between sends of a root record that fell short


class RequestRefused(Exception):
    """A request that cannot be done now or as asked (the message says why)."""


class RemountRequests:
    """Answers the remount part's control requests."""

    def __init__(
        self,
        commits: Commits,
        publisher: RootPublisher,
        committer: Committer,
        snapshots: SnapshotStore,
        index: MetaIndex,
        restorer: Restorer,
        restore: TreeRestore,
        keeper: LeaseKeeper,
        blocks: BlockStore,
        *,
        conflicts: Callable[[], list[str]] = lambda: [],
        settle: Callable[[float], Awaitable[Any]],
        retention: Retention,
        networked: Callable[[], bool],
    ) -> None:
        self.commits = commits
        self.publisher = publisher
        self.committer = committer
        self.snapshots = snapshots
        self.index = index
        self.restorer = restorer
        self.conflicts = conflicts
        self.restore = restore
        self.keeper = keeper
        self.blocks = blocks
        self.settle = settle  # moves blocks stored before there were peers onto peers
        self.retention = retention
        self.networked = networked

    async def sync(self, timeout: float) -> dict[str, Any]:
        """fluidfs sync: commit, and wait until everything it names is fully stored."""
        started = time.monotonic()
        commits = self.commits
        result = None
        written = CommitStats()
        with trio.move_on_after(timeout):
            if self.blocks.remote is not None:
                await self.settle(SYNC_STALL)
            result = await commits.commit(user_changed=commits.changes_pending, stall=SYNC_STALL)
            if result is not None:
                written.add(result.stats)
            for _ in range(SYNC_ROUNDS):
                full = await wait_placed(self.blocks, None, stall=SYNC_STALL, limit=timeout)
                last = self.committer.last
                again = commits.schedule.again_pending
                if last is None or not (last.stats.incomplete_refs or last.stats.weak_refs):
                    if not again:
                        break
                elif not full and not again:
                    break
                # A commit withheld for naming blocks below K holders is made again once
                # they are placed, even if the tree did not change since: its root was
                # never published, and that is what sync waits for. (Holders merely to
                # record wait for the next commit: a small sync stays one commit.)
                short = last is not None and bool(last.stats.weak_refs)
                more = await commits.commit(
                    user_changed=False, force=again or (short and full), stall=SYNC_STALL
                )
                if more is None:
                    break
                result = more
                written.add(more.stats)
        await commits.publish_pending()
        # A root record that reached too few peers (busy on a thin line, say) is sent
        # again until the sync's own time is up, rather than failing the sync at once.
        deadline = started + timeout
        while (
            self.publisher.pending is not None
            and self.keeper.may_commit
            and time.monotonic() + PUBLISH_RETRY < deadline
        ):
            await trio.sleep(PUBLISH_RETRY)
            await commits.publish_pending()
        head = self.committer.heads.latest()
        blocks = self.blocks
        local = 0
        if blocks.remote is not None:  # without peers, local is simply where blocks live
            ids = await trio.to_thread.run_sync(blocks.local_only_ids, limiter=blocks.limiter)
            local = len(ids)
        await trio.to_thread.run_sync(blocks.meta.release_pages, limiter=blocks.limiter)
        under = len(blocks.under)
        last = self.committer.last
        weak = last.stats.weak_refs if last is not None else 0
        waiting = self.publisher.pending is not None
        published = head is not None and head.published and not waiting
        networked = self.networked()
        full = networked and under == 0 and local == 0 and published and not weak
        stats = written if result is not None else None
        return {
            "seq": head.seq if head else 0,
            "snapshot": result.snapshot if result is not None else None,
            "committed": result is not None,
            "network": networked,
            "full": full,
            "under_replicated": under,
            "local_only_blocks": local,
            "root_peers": self.publisher.published_to,
            "published": published,
            "weak_refs": weak,
            "nodes_written": stats.nodes_written if stats else 0,
            "bytes_written": stats.bytes_written if stats else 0,
            "shard_bytes": stats.shard_bytes if stats else 0,
            "seconds": time.monotonic() - started,
            "timed_out": time.monotonic() - started >= timeout,
        }

    def list_snapshots(self, retention: Retention | None = None) -> list[dict[str, Any]]:
        """The kept snapshots with the retention rule that keeps each."""
        retention = retention or self.retention
        snaps = self.snapshots.list()
        rules = retention.keep([(s.seq, s.when) for s in snaps], time.time_ns())
        return [
            {
                "name": s.name,
                "seq": s.seq,
                "time": s.when / 1e9,
                "kept_by": rules.get(s.seq, "expired"),
            }
            for s in snaps
        ]

    async def forget(
        self, retention: Retention | None, names: list[str], dry_run: bool
    ) -> dict[str, Any]:
        """fluidfs forget: drop the snapshots the policy (or the names given) no longer keeps."""
        if not self.committer.index_complete():
            left = len(self.restorer.pending())
            raise RequestRefused(
                "this state directory is still rebuilding its index from the network "
                f"({left} directories to go); forgetting snapshots is safe once that is done"
            )
        policy = retention or self.retention
        snaps = self.snapshots.list()
        known = {s.name for s in snaps}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RequestRefused("no such snapshot: " + ", ".join(unknown))
        chooser = _Chooser(policy, {s.seq for s in snaps if s.name in names} if names else None)
        keep = chooser.keep([(s.seq, s.when) for s in snaps], time.time_ns())
        expire = [s.name for s in snaps if s.seq not in keep]
        if dry_run or not expire:
            return {"expired": expire, "kept": len(snaps) - len(expire), "released_blocks": 0}
        before = self.blocks.count()
        result = await self.commits.commit(
            user_changed=self.commits.changes_pending, retention=chooser
        )
        released = max(0, before - self.blocks.count())
        return {
            "expired": result.expired if result is not None else [],
            "kept": len(self.snapshots.list()),
            "released_blocks": released,
            "seq": result.head.seq if result is not None else 0,
        }

    def status(self) -> dict[str, Any]:
        """The ``commit`` figures of `fluidfs status`."""
        head = self.committer.heads.latest()
        last = self.committer.last
        lost = self.keeper.lease.lost
        restored = self.restore.restored
        return {
            "writer": self.keeper.writer,
            "lost_to": lost.where() if lost else (self.keeper.lost_reason or None),
            "head_seq": head.seq if head else 0,
            "head_time": head.time_ns / 1e9 if head else 0,
            "published": self.publisher.pending is None,
            "changes_pending": self.commits.changes_pending,
            "snapshots": len(self.snapshots.list()),
            "metadata_nodes": self.index.count(),
            "lazy_dirs": len(self.restorer.pending()),
            "index_complete": self.committer.index_complete(),
            "restored": vars(restored) if restored is not None else None,
            "tree_reads": self.commits.tree_reads,
            "last_commit": None
            if last is None
            else {
                "seq": last.head.seq,
                "nodes_written": last.stats.nodes_written,
                "bytes_written": last.stats.bytes_written,
                "shard_bytes": last.stats.shard_bytes,
                "nodes_reused": last.stats.nodes_reused,
                "seconds": last.stats.seconds,
                "dirs": last.stats.dirs,
                "full": last.stats.full,
            },
            "last_error": self.keeper.lost_reason or self.commits.last_error,
            # Writes acknowledged here that no published commit holds, with no lease left
            # to publish them under: kept in this state directory and readable here.
            # Folders of .fluidfs-conflicts/: kept writes of a replaced mount, shown
            # until the user has moved what they need and deleted the folder.
            "conflicts": self.conflicts(),
            "unpublished": not self.keeper.may_commit
            and (
                self.commits.changes_pending
                or self.publisher.pending is not None
                or (head is not None and not head.published)
            ),
        }


def handlers(requests: RemountRequests) -> dict[str, control.Handler]:
    """Control-socket commands: sync, snapshots, forget (domain errors become replies)."""

    async def sync(request: dict) -> dict:
        timeout = float(request.get("wait", 3600))
        with _refusals():
            return await requests.sync(timeout)

    async def snapshots(request: dict) -> dict:
        with _refusals():
            retention = _retention(request.get("retention"))
        policy = retention or requests.retention
        return {"snapshots": requests.list_snapshots(policy), "retention": str(policy)}

    async def forget(request: dict) -> dict:
        names = [str(n) for n in request.get("names", [])]
        with _refusals():
            retention = _retention(request.get("retention"))
            return await requests.forget(retention, names, bool(request.get("dry_run")))

    return {"sync": sync, "snapshots": snapshots, "forget": forget}


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Turn the remount part's domain errors into control replies."""
    try:
        yield
    except (NotWriter, RequestRefused) as exc:
        raise control.ControlError(str(exc)) from None


class _Chooser:
    """The retention policy, or (with *drop*) exactly the named snapshots go (never the newest)."""

    def __init__(self, policy: Retention, drop: set[int] | None) -> None:
        self.policy = policy
        self.drop = drop

    def keep(self, snaps: list[tuple[int, int]], now_ns: int) -> dict[int, str]:
        if not snaps or self.drop is None:
            return self.policy.keep(snaps, now_ns)
        newest = max(snaps, key=lambda s: (s[1], s[0]))[0]
        return {seq: "kept" for seq, _ in snaps if seq not in self.drop or seq == newest}


def _retention(text: object) -> Retention | None:
    """A retention rule from a request (RequestRefused if it does not parse)."""
    if not text:
        return None
    try:
        return Retention.parse(str(text))
    except ValueError as exc:
        raise RequestRefused(str(exc)) from None
