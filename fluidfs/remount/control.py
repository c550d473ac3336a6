"""What `fluidfs sync`, `snapshots`, `forget` and `status` ask of the node's remount part.

Split from remount.py (the loops and mount-time checks): these are the answers to
control-socket requests (control.py, protocol version 1), each a JSON-able dict.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from fluidfs import control
from fluidfs.fs.commit import CommitStats, wait_placed
from fluidfs.fs.snapshots import Retention

if TYPE_CHECKING:
    from fluidfs.remount.remount import Remount

SYNC_STALL = 20.0  # fluidfs sync: seconds without placement progress before reporting


class RemountControl:
    """Answers control requests for one node's Remount."""

    def __init__(self, remount: Remount) -> None:
        self.remount = remount

    async def sync(self, timeout: float) -> dict[str, Any]:
        """fluidfs sync: commit, and wait until everything it names is fully stored."""
        started = time.monotonic()
        result = None
        written = CommitStats()
        with trio.move_on_after(timeout):
            if self.remount.node.blocks.remote is not None:
                # blocks stored before there were peers go to them first
                await self.remount.node.migrator.settle(SYNC_STALL)
            changed = self.remount.changed_at is not None
            result = await self.remount.commit(user_changed=changed, stall=SYNC_STALL)
            if result is not None:
                written.add(result.stats)
            for _ in range(3):  # holders may have improved after the tree was written
                full = await wait_placed(
                    self.remount.node.blocks, None, stall=SYNC_STALL, limit=timeout
                )
                last = self.remount.committer.last
                if last is None or not (last.stats.incomplete_refs or last.stats.weak_refs):
                    if not self.remount.force_commit:
                        break
                elif not full and not self.remount.force_commit:
                    break
                again = await self.remount.commit(
                    user_changed=False, force=self.remount.force_commit, stall=SYNC_STALL
                )
                self.remount.force_commit = False
                if again is None:
                    break
                result = again
                written.add(again.stats)
        if self.remount.pending_publish is not None:
            await self.remount._publish(self.remount.pending_publish)
        head = self.remount.committer.heads.latest()
        blocks = self.remount.node.blocks
        local = 0
        if blocks.remote is not None:  # without peers, local is simply where blocks live
            ids = await trio.to_thread.run_sync(blocks.local_only_ids, limiter=blocks.limiter)
            local = len(ids)
        under = len(blocks.under)
        last = self.remount.committer.last
        weak = last.stats.weak_refs if last is not None else 0
        published = head is not None and head.published and self.remount.pending_publish is None
        full = self.remount.networked and under == 0 and local == 0 and published and not weak
        stats = written if result is not None else None
        return {
            "seq": head.seq if head else 0,
            "snapshot": result.snapshot if result is not None else None,
            "committed": result is not None,
            "network": self.remount.networked,
            "full": full,
            "under_replicated": under,
            "local_only_blocks": local,
            "root_peers": self.remount.published_to,
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
        retention = retention or self.remount.options.retention
        snaps = self.remount.snapshots.list()
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
        if not self.remount.committer.index_complete():
            left = len(self.remount.restorer.pending())
            raise control.ControlError(
                "this state directory is still rebuilding its index from the network "
                f"({left} directories to go); forgetting snapshots is safe once that is done"
            )
        policy = retention or self.remount.options.retention
        snaps = self.remount.snapshots.list()
        known = {s.name for s in snaps}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise control.ControlError("no such snapshot: " + ", ".join(unknown))
        chooser = _Chooser(policy, {s.seq for s in snaps if s.name in names} if names else None)
        keep = chooser.keep([(s.seq, s.when) for s in snaps], time.time_ns())
        expire = [s.name for s in snaps if s.seq not in keep]
        if dry_run or not expire:
            return {"expired": expire, "kept": len(snaps) - len(expire), "released_blocks": 0}
        before = self.remount.node.blocks.count()
        changed = self.remount.changed_at is not None
        result = await self.remount.commit(user_changed=changed, retention=chooser)
        released = max(0, before - self.remount.node.blocks.count())
        return {
            "expired": result.expired if result is not None else [],
            "kept": len(self.remount.snapshots.list()),
            "released_blocks": released,
            "seq": result.head.seq if result is not None else 0,
        }

    def status(self) -> dict[str, Any]:
        """Figures for `fluidfs status`."""
        head = self.remount.committer.heads.latest()
        last = self.remount.committer.last
        return {
            "writer": self.remount.writer,
            "lost_to": self.remount.lease.lost.where() if self.remount.lease.lost else None,
            "head_seq": head.seq if head else 0,
            "head_time": head.time_ns / 1e9 if head else 0,
            "published": self.remount.pending_publish is None,
            "changes_pending": self.remount.changed_at is not None,
            "snapshots": len(self.remount.snapshots.list()),
            "metadata_nodes": self.remount.index.count(),
            "lazy_dirs": len(self.remount.restorer.pending()),
            "index_complete": self.remount.committer.index_complete(),
            "restored": self.remount.restored,
            "tree_reads": self.remount.tree_reads,
            "last_commit": None
            if last is None
            else {
                "seq": last.head.seq,
                "nodes_written": last.stats.nodes_written,
                "bytes_written": last.stats.bytes_written,
                "shard_bytes": last.stats.shard_bytes,
                "nodes_reused": last.stats.nodes_reused,
                "seconds": last.stats.seconds,
            },
            "last_error": self.remount.last_error,
        }

    def handlers(self) -> dict[str, control.Handler]:
        """Control-socket commands: sync, snapshots, forget."""

        async def sync(request: dict) -> dict:
            timeout = float(request.get("wait", 3600))
            return await self.sync(timeout)

        async def snapshots(request: dict) -> dict:
            retention = _retention(request.get("retention"))
            policy = retention or self.remount.options.retention
            return {"snapshots": self.list_snapshots(policy), "retention": str(policy)}

        async def forget(request: dict) -> dict:
            retention = _retention(request.get("retention"))
            names = [str(n) for n in request.get("names", [])]
            return await self.forget(retention, names, bool(request.get("dry_run")))

        return {"sync": sync, "snapshots": snapshots, "forget": forget}


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
    if not text:
        return None
    try:
        return Retention.parse(str(text))
    except ValueError as exc:
        raise control.ControlError(str(exc)) from None
