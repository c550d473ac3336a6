"""The lease gate: whether a mount may go ahead, and with which tree.

Before the mount is made usable, a node with peers (or told of some):

- reaches the keyfile's peers (remount/dialer.py) and takes the writer lease
  (peers/lease.py; refused while another live mount holds it, unless ``--takeover``);
- finds the newest valid root record (peers/rootrecord.py) and, on a fresh state
  directory, adopts that commit (remount/restore.py) before the mount is usable;
- lets a fresh state directory start *empty* only when that cannot orphan a backup: a
  quorum of peers must say they hold no root record for this keyfile (``not_found``
  from at least K of them, K = shards needed to rebuild a block, and from no fewer
  than the keyfile lists), or the backup is known to be new (``--new``, or the keyfile
  was created for this state directory: statedir.py ``new-key``, or an earlier mount
  of this still-empty state started it new: store/settings.py ``origin``). Otherwise
  the mount is refused. One peer saying ``not_found`` proves nothing: it may be new,
  have lost its records, or be someone else answering at a bootstrap address. An
  empty start would commit a tree whose records, once the mount reached the real
  holders, replace the real backup's root there. While not enough peers have answered,
  it asks again every second for up to ``restore_wait`` seconds;
- on a state directory that is not fresh, when the newest root was written by another
  machine after this state's last commit (this state was replaced as the writer), keeps
  what this state holds beyond its last published commit and adopts the newer tree
  (remount/conflicts.py); then brings any kept writes into the live tree under
  ``.fluidfs-conflicts/``.

A node without peers has nowhere to back up to and nothing to check: the gate lets it
through at once.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable

import trio

from fluidfs.blocks.blockstore import BlockStore
from fluidfs.fs.commit import Heads
from fluidfs.fs.metaindex import MetaError
from fluidfs.fs.tree import ROOT_INO, Tree
from fluidfs.peers.lease import LeaseHeld, LeaseInfo, Look, NoPeerAnswered
from fluidfs.peers.rootrecord import Found, RecordClient
from fluidfs.remount.conflicts import FOLDER, Conflicts
from fluidfs.remount.dialer import PeerDialer
from fluidfs.remount.leasekeeper import LeaseKeeper
from fluidfs.remount.options import RemountError, RemountOptions
from fluidfs.remount.publisher import RootPublisher
from fluidfs.remount.restore import RestoreError, TreeRestore
from fluidfs.store.settings import ORIGIN_NEW, ORIGIN_RESTORED, StateSettings

log = logging.getLogger(__name__)

ASK_AGAIN = 1.0  # seconds between asks while too few peers answered


class FreshStart(enum.Enum):
    """What a fresh state directory does with the root records peers answered with."""

    RESTORE = "restore"
    START_NEW = "start new"
    REFUSE = "refuse"


def quorum(needed: int, listed: int) -> int:
    """``not_found`` answers a fresh state needs to start empty: K, and all the keyfile lists."""
    return max(needed, listed)


def answered_enough(found: Found | None, *, waiting: bool, quorum: int) -> bool:
    """True when the answers so far settle the question (stop asking again)."""
    if found is None:
        return False
    return found.exists or not waiting or found.absent >= quorum


def fresh_start(found: Found | None, *, known_new: bool, quorum: int) -> FreshStart:
    """The fresh-state rule of the module docstring."""
    if found is not None and found.exists:
        return FreshStart.RESTORE
    if known_new or (found is not None and found.absent >= quorum):
        return FreshStart.START_NEW
    return FreshStart.REFUSE


def countdown(left: float, holder: LeaseInfo | None) -> str:
    """The line shown each second while a lease that was not handed over is waited out."""
    who = f"the writer on {holder.where()}" if holder is not None else "the last writer"
    return (
        f"waiting for {who} to hand over the writer lease; taking it in {math.ceil(left)} s "
        "if it does not answer"
    )


def forked(found: Found | None, machine: bytes, published_seq: int) -> str | None:
    """How another machine moved the backup on since the last commit this used state
    directory published or adopted (*published_seq*; its writes outside that tree are
    then kept as conflicts), or None.

    Any other root than that one counts, whatever its number: this state may hold local
    commits numbered past it that never reached the network, and a root of another
    machine's with a lower number but a later fence is still the backup now."""
    if found is None or not found.exists:
        return None
    if found.body.get("machine") == machine or found.seq == published_seq:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.body.get("time", 0) / 1e9))
    return (
        f"the backup of this keyfile was changed on host {found.body.get('host', '?')} "
        f"(commit {found.seq} at {when}) after this state directory last published "
        f"(commit {published_seq})"
    )


def same_root(early: Found | None, found: Found | None) -> bool:
    """Whether the root read under the lease is the one read before it (both exist)."""
    return (
        early is not None and found is not None and early.exists and found.exists
        and (early.fence, early.seq) == (found.fence, found.seq)
    )


class Steps:
    """How long each step of the gate took, and the process's CPU time in it (every
    thread's), for its log line."""

    def __init__(self) -> None:
        self.last = (time.monotonic(), time.process_time())
        self.steps: list[tuple[str, float, float]] = []

    def mark(self, step: str) -> None:
        """*step* ended now."""
        now = (time.monotonic(), time.process_time())
        self.steps.append((step, now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{step} {seconds:.3f} s ({cpu:.3f} CPU-s)"
                         for step, seconds, cpu in self.steps)


class MountGate:
    """Settles the lease and the tree before a mount; raises RemountError to refuse."""

    def __init__(
        self,
        options: RemountOptions,
        dialer: PeerDialer,
        keeper: LeaseKeeper,
        records: RecordClient,
        publisher: RootPublisher,
        restore: TreeRestore,
        settings: StateSettings,
        heads: Heads,
        tree: Tree,
        blocks: BlockStore,
        conflicts: Conflicts,
        *,
        machine: bytes,
        quorum: int,
        made_for_state: bool,
        networked: Callable[[], bool],
    ) -> None:
        self.options = options
        self.dialer = dialer
        self.keeper = keeper
        self.records = records
        self.publisher = publisher
        self.restore = restore
        self.settings = settings
        self.heads = heads
        self.tree = tree
        self.blocks = blocks
        self.conflicts = conflicts
        self.machine = machine
        self.quorum = quorum
        self.made_for_state = made_for_state  # the keyfile was created for this state
        self.networked = networked

    def fresh(self) -> bool:
        """A state directory that has never held or committed a tree."""
        if self.heads.latest() is not None:
            return False
        return self.tree.is_empty(ROOT_INO) and self.blocks.count() == 0

    def known_new(self) -> bool:
        """This state directory may start empty without asking peers."""
        return (
            self.options.new
            or self.settings.origin() == ORIGIN_NEW
            or self.made_for_state
        )

    async def before_mount(self, on_progress: Callable[[str], None] = lambda line: None) -> None:
        """Lease, newest root, and restore on a fresh state; raise RemountError to refuse.
        *on_progress* gets a line a second while the lease is waited for."""
        if not self.networked():
            return
        fresh = self.fresh()
        new = fresh and self.known_new()
        steps = Steps()
        waiting = fresh and not new
        early: Found | None = None
        seen: Look | None = None
        if waiting:
            # A fresh machine knows only the keyfile's few addresses: the newest root lists
            # the backup's peers (the lease's holders among them), and whether a backup
            # exists at all must be settled before anything is taken or written. Who
            # answers at a bare address is learnt first; the pinned peers are read as
            # each connects (the reads dial them), not once the slowest has.
            await self.dialer.reach(pinned=False)
            self.dialer.know_pinned()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.dialer.reach)
                early, seen = await self._root_and_lease()
            steps.mark("peers dialled and root read")
            if fresh_start(early, known_new=False, quorum=self.quorum) is FreshStart.REFUSE:
                self._refuse_empty(early)
        else:
            await self.dialer.reach()
            steps.mark("peers dialled")
        found: Found | None = None
        refused: RemountError | None = None
        warming = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            if early is not None and early.exists:
                # The root just found is almost always the one adopted once the lease is
                # held: its first blocks are rebuilt meanwhile (reads only, kept in memory).
                nursery.start_soon(self._warm, early, warming)
            try:
                found = await self._take_lease(seen, waiting, on_progress)
            except RemountError as exc:  # raised below, outside the nursery (no group)
                refused = exc
            if refused is not None or not same_root(early, found):
                warming.cancel()
        if refused is not None:
            raise refused
        steps.mark("lease taken")
        if found is not None and found.exists:
            self.publisher.seen(found.seq)
        if fresh:
            await self._settle_fresh(found, new)
            steps.mark("tree adopted")
            log.info("mount gate: %s", steps)
            return
        published = [h.seq for h in self.heads.all() if h.published]
        moved_on = forked(found, self.machine, published[-1] if published else 0)
        if moved_on is not None:
            assert found is not None
            log.warning("%s: adopting it; what this state directory held beyond its last "
                        "published commit goes to %s/", moved_on, FOLDER.decode())
            try:
                await self.conflicts.rescue(found)
            except RestoreError as exc:
                raise RemountError(str(exc)) from None
            except MetaError as exc:  # the last published tree, to compare with
                raise RemountError(
                    f"cannot read this state directory's last published commit to keep "
                    f"its unpublished writes: {exc}; mount again once peers are reachable"
                ) from None
        await self.conflicts.import_pending()
        log.info("mount gate: %s", steps)

    async def _take_lease(
        self, seen: Look | None, waiting: bool, on_progress: Callable[[str], None]
    ) -> Found | None:
        """Take the lease (from *seen* if given), then read the newest root again under
        it: a writer may have published one since the first read."""
        try:
            await self.keeper.acquire(
                takeover=self.options.takeover,
                on_wait=lambda left, holder: on_progress(countdown(left, holder)),
                seen=seen,
            )
        except NoPeerAnswered as exc:
            if waiting:
                self._refuse_empty(None)
            raise RemountError(str(exc)) from None
        except LeaseHeld as exc:
            raise RemountError(str(exc)) from None
        found, _ = await self._newest_root(0.0, waiting)
        return found

    async def _root_and_lease(self) -> tuple[Found | None, Look | None]:
        """A fresh machine's first round: the newest root (asked again for up to
        ``restore_wait`` seconds while too few peers answered) and, at the same time, the
        lease as the same peers hold it. The look is kept for taking the lease only if
        it is still the look the take would make: the root was found at the first ask
        and named no peer we did not already ask."""
        asked = set(self.records.targets())
        seen: Look | None = None

        async def look() -> None:
            nonlocal seen
            seen = await self.keeper.lease.look()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            found, asks = await self._newest_root(self.options.restore_wait, True)
        if asks > 1 or set(self.records.targets()) != asked:
            seen = None
        return found, seen

    async def _warm(self, found: Found, scope: trio.CancelScope) -> None:
        with scope:
            await self.restore.warm(found)

    async def _newest_root(self, wait: float, waiting: bool) -> tuple[Found | None, int]:
        """The newest root, and how many times the peers were asked for it."""
        deadline = trio.current_time() + wait
        asks = 0
        while True:
            found = await self.records.newest("root", follow_peers=True)
            asks += 1
            if answered_enough(found, waiting=waiting, quorum=self.quorum):
                return found, asks
            if trio.current_time() >= deadline:
                return found, asks
            await trio.sleep(ASK_AGAIN)
            await self.dialer.reach()

    async def _settle_fresh(self, found: Found | None, new: bool) -> None:
        decision = fresh_start(found, known_new=new, quorum=self.quorum)
        if decision is FreshStart.REFUSE:
            self._refuse_empty(found)
        if decision is FreshStart.RESTORE:
            assert found is not None
            if self.options.new:
                log.warning("--new, but this keyfile has a backup (commit %d): restoring it",
                            found.seq)
            try:
                await self.restore.adopt(found)
            except RestoreError as exc:
                raise RemountError(str(exc)) from None
            self.settings.set_origin(ORIGIN_RESTORED)
            return
        self.settings.set_origin(ORIGIN_NEW)
        log.info(
            "starting a new backup (%s)",
            "known new"
            if new
            else f"{found.absent if found else 0} peers said this keyfile has none, "
            f"{self.quorum} needed",
        )

    def _refuse_empty(self, found: Found | None) -> None:
        """Raise the RemountError of a fresh state directory that may not start empty."""
        errors = self.dialer.errors
        failed = "; ".join(f"{a}: {e}" for a, e in list(errors.items())[:4])
        failed = f" ({failed})" if failed else ""
        advice = "or mount with --new if this keyfile is for a new backup"
        if found is None:
            tried = self.dialer.tried()
            raise RemountError(
                "no peer answered, so fluidfs cannot tell whether this keyfile already has "
                "a backup; mount again once a peer is reachable (tried: "
                f"{', '.join(tried[:8]) or 'no addresses'}){failed}; {advice}"
            )
        raise RemountError(
            f"cannot tell whether this keyfile already has a backup: {found.absent} of the "
            f"{found.answered} peers that answered say it has none, and {self.quorum} must "
            "before fluidfs starts an empty one (an empty start could replace an existing "
            f"backup){failed}; mount again once more peers are reachable, {advice}"
        )
