"""When the next automatic commit is due, and why: a state machine with no I/O.

The commit loop (remount/commits.py) feeds it events — a change through the mount,
a commit started, finished or failed, the outcome of publishing a root record, the
holders' version, the lease lost, the unmount — and asks :meth:`CommitSchedule.next`
what is due next. Times are plain numbers on one monotonic clock chosen by the caller
(the loop uses ``trio.current_time()``), so the rules can be tested with made-up times.

The rules:

- changes are committed once they have been quiet for ``quiet`` seconds, and at the
  latest ``max_delay`` after the first of them;
- a root record that reached too few peers is published again ``publish_retry``
  seconds later; when peers hold a root numbered past ours, the same tree is committed
  again at once under a higher number;
- every ``refresh_interval`` (sooner, ``incomplete_recheck`` after a commit named
  incomplete holders, or ``publish_retry`` after a root was withheld because some block
  had fewer than K holders), the tree is committed again — but only if some block's
  holders changed since the last commit read the tree, or ``retention_interval`` has
  passed since then (so old snapshots expire);
- without peers (``automatic`` off), after the lease is lost, and once stopping,
  nothing is due: commits happen only on request.

When several things are due at once they go in this order: changes, commit again,
publish, refresh.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

REFRESH_INTERVAL = 600.0  # re-commit this often if holders have changed
RETENTION_INTERVAL = 3600.0  # and at least this often anyway, so old snapshots expire
INCOMPLETE_RECHECK = 15.0  # after a commit naming incomplete holders, look again this soon
PUBLISH_RETRY = 10.0


class Action(enum.Enum):
    """What the commit loop should do when a deadline comes."""

    COMMIT_CHANGES = "commit changes"  # user_changed=True: a new snapshot
    COMMIT_AGAIN = "commit again"  # force=True: peers hold a root numbered past ours
    PUBLISH = "publish"  # send the pending root record again
    REFRESH = "refresh"  # user_changed=False: newer holders, or retention


@dataclass(frozen=True)
class Due:
    """The next thing due: *action* at time *at* (possibly already past), and why."""

    at: float
    action: Action
    reason: str


@dataclass(frozen=True)
class SchedulePolicy:
    """The intervals of the rules in the module docstring, in seconds."""

    quiet: float = 30.0
    max_delay: float = 300.0
    refresh_interval: float = REFRESH_INTERVAL
    retention_interval: float = RETENTION_INTERVAL
    incomplete_recheck: float = INCOMPLETE_RECHECK
    publish_retry: float = PUBLISH_RETRY


_ORDER = [Action.COMMIT_CHANGES, Action.COMMIT_AGAIN, Action.PUBLISH, Action.REFRESH]


class CommitSchedule:
    """The commit scheduler's state; every method is an event or a question."""

    def __init__(self, policy: SchedulePolicy, *, automatic: bool, dirty: bool = False) -> None:
        self.policy = policy
        self.automatic = automatic  # False without peers: commits only on request
        self.writer = True
        self.stopping = False
        # The first change not yet committed; *dirty*: changes a previous run left.
        self.changed_at: float | None = 0.0 if dirty else None
        self.last_change = 0.0
        self.again_at: float | None = None  # commit the same tree again (COMMIT_AGAIN)
        self.publish_at: float | None = None  # a root record waits to be sent again
        self.recheck_at: float | None = None  # an early refresh
        self.last_refresh = 0.0  # when the refresh interval last started
        self.last_full = 0.0  # when a commit last read the whole tree
        self.holders_version = 0
        # The holders' version when the last commit read the tree: a refresh that would
        # name the same holders (and change nothing else) is not worth writing.
        self.committed_version = -1

    # --- events ----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The loop starts at *now*: every interval counts from here, open changes too."""
        self.last_refresh = self.last_full = self.last_change = now
        if self.changed_at is not None:
            self.changed_at = now

    def changed(self, now: float) -> bool:
        """The tree changed; True if this opened a new window of uncommitted changes."""
        opened = self.changed_at is None
        if opened:
            self.changed_at = now
        self.last_change = now
        return opened

    def network(self, available: bool) -> None:
        """The node has (or no longer has) peers to commit to."""
        self.automatic = available

    def holders_changed(self, version: int) -> None:
        """The block store's holders version is now *version*."""
        self.holders_version = version

    def commit_started(self, *, user_changed: bool) -> None:
        """A commit is reading the tree; with *user_changed* it takes the open changes."""
        if user_changed:
            self.changed_at = None
        self.again_at = None

    def commit_finished(
        self, now: float, *, holders_version: int, incomplete: bool, user_changed: bool
    ) -> None:
        """A commit read the tree at *holders_version* (written or found unchanged)."""
        self.committed_version = holders_version
        self.last_full = now
        if user_changed:
            self.last_refresh = now
        if incomplete:
            self.recheck_at = now + self.policy.incomplete_recheck

    def commit_failed(self, now: float, *, reopen: bool) -> bool:
        """A commit failed; with *reopen* its changes are due again. True if reopened."""
        if reopen and self.changed_at is None:
            self.changed_at = self.last_change = now
            return True
        return False

    def published(self) -> None:
        """The pending root record reached enough peers (or needs no peers)."""
        self.publish_at = None

    def publish_short(self, now: float) -> None:
        """The root record reached too few peers: send it again later."""
        self.publish_at = now + self.policy.publish_retry

    def publish_withheld(self, now: float) -> None:
        """The commit names blocks too few peers hold: commit again later, then publish."""
        self.publish_at = None
        self.recheck_at = now + self.policy.publish_retry

    def publish_superseded(self, now: float) -> None:
        """Peers hold a root numbered past ours: commit the same tree again, now."""
        self.publish_at = None
        self.again_at = now

    def lease_lost(self) -> None:
        """Another mount took the writer lease: no more commits."""
        self.writer = False

    def stop(self) -> None:
        """Unmounting: the last commit is the unmount's own."""
        self.stopping = True

    def fired(self, due: Due, now: float) -> Action | None:
        """The deadline of *due* came: the action to take now, or None if none is needed.

        Only a refresh can turn out not to be needed (same holders, retention not due);
        the schedule then moves the refresh on by itself.
        """
        if due.action is Action.COMMIT_AGAIN:
            self.again_at = None
        if due.action is not Action.REFRESH:
            return due.action
        self.last_refresh = now
        unchanged = self.holders_version == self.committed_version
        if unchanged and now - self.last_full < self.policy.retention_interval:
            if self.recheck_at is not None:
                self.recheck_at = now + self.policy.incomplete_recheck
            return None
        self.recheck_at = None
        return Action.REFRESH

    # --- questions -------------------------------------------------------------------------

    @property
    def changes_pending(self) -> bool:
        """Changes through the mount that no commit has taken yet."""
        return self.changed_at is not None

    @property
    def again_pending(self) -> bool:
        """A commit of the same tree under a higher number is wanted."""
        return self.again_at is not None

    def next(self, now: float) -> Due | None:
        """What is due next: the first of those already due (in rule order), else the soonest.

        None when nothing will ever be due without a new event (no peers, lease lost,
        stopping).
        """
        if not self.automatic or not self.writer or self.stopping:
            return None
        candidates = self._candidates()
        ready = [d for d in candidates if d.at <= now]
        if ready:
            return min(ready, key=lambda d: _ORDER.index(d.action))
        return min(candidates, key=lambda d: (d.at, _ORDER.index(d.action)))

    def _candidates(self) -> list[Due]:
        policy = self.policy
        out = []
        if self.changed_at is not None:
            quiet = self.last_change + policy.quiet
            latest = self.changed_at + policy.max_delay
            reason = (
                f"changes quiet for {policy.quiet:g} s"
                if quiet <= latest
                else f"first change {policy.max_delay:g} s ago"
            )
            out.append(Due(min(quiet, latest), Action.COMMIT_CHANGES, reason))
        if self.again_at is not None:
            out.append(Due(self.again_at, Action.COMMIT_AGAIN, "peers hold a newer root"))
        if self.publish_at is not None:
            out.append(Due(self.publish_at, Action.PUBLISH, "root reached too few peers"))
        periodic = self.last_refresh + policy.refresh_interval
        early = self.recheck_at if self.recheck_at is not None else math.inf
        reason = (
            "recheck holders" if early < periodic else f"every {policy.refresh_interval:g} s"
        )
        out.append(Due(min(early, periodic), Action.REFRESH, reason))
        return out
