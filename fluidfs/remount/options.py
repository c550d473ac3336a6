"""Settings of the remount part (commits, lease, restore), and its refusal."""

from __future__ import annotations

from dataclasses import dataclass, field

from fluidfs.fs.snapshots import Retention
from fluidfs.keys import BootstrapPeer
from fluidfs.peers.lease import DEFAULT_RENEW
from fluidfs.remount.schedule import REFRESH_INTERVAL, SchedulePolicy


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

    def schedule(self) -> SchedulePolicy:
        """The commit schedule's intervals."""
        return SchedulePolicy(
            quiet=self.commit_quiet,
            max_delay=self.commit_max_delay,
            refresh_interval=self.refresh_interval,
        )
