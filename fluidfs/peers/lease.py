"""The writer lease: one mount per keyfile writes at a time, by a quorum and a fence.

The mount that writes the tree holds a *lease*: a ``lease`` record (see rootrecord.py)
naming its machine (a random id per state directory), host, mount point and pid, kept
on a fixed set of peers, its *holders* (listed in the record; chosen by the first mount
of the keyfile among the peers that answered it, at most ``MAX_HOLDERS``). Every change
of the lease is a compare-and-swap (``PutRecord`` with ``expect``, the seq each holder
had when we looked) that counts only when a *majority* of the holders stored it: of two
mounts changing it at once at most one gets a majority, and two groups of peers that
cannot reach each other cannot both hold one.

- **Fence.** The record's envelope carries a fencing number, one more at each change of
  writer; renewals keep it. Every root record is written under the writer's fence, and
  peers refuse any record whose fence is below the highest they hold for the keyfile: a
  replaced writer can change nothing any more, whatever it believes.
- **Freshness.** The holder renews every ``renew`` seconds. It may acknowledge writes
  only until ``bound`` (``FRESH_FACTOR`` x ``renew``) after the start of its last renewal
  that reached a majority (its monotonic clock). Another machine takes a lease held by
  someone else only after its own request reached a majority and ``bound`` +
  ``margin(bound)`` more seconds passed on its own clock - or earlier, when the holder
  hands over. By then the old holder has stopped acknowledging writes: its renewals
  cannot reach a majority past the request.
- **Handover.** To take the lease a mount first writes a ``handover`` request (state
  ``"handover"``, same fence, naming who asks). The holder sees it at its next renewal,
  stops acknowledging writes, commits what it acknowledged, and writes the lease
  ``"released"``; the asker then takes it with the next fence at once. A ``released``
  lease, or one of this very machine (a crashed earlier mount of this state
  directory), is taken at once.
- Without ``--takeover``, a lease that another machine renewed within its bound (by
  its wall clock) refuses the mount with a message saying where the tree is mounted.

- **Re-forming the holder set (joint consensus).** The set follows the holder's live
  agreements: while it holds a fresh lease, a renewal whose set ``S`` differs from its
  partners (holders whose agreement ended dropped, new partners added, at most
  ``MAX_HOLDERS``) writes a *joint* lease naming ``S`` and ``S'`` (``joining``). Only
  once a joint renewal was stored by a majority of ``S`` *and* a majority of ``S'`` does
  the next renewal name ``S'`` alone. Safety, as in Raft's membership change: every
  record is a compare-and-swap needing a majority of each set it names, and a taker
  needs majorities of every set named in the newest lease it read. Before the switch
  every record is on a majority of ``S``, so any taker (it needs a majority of ``S``
  whatever it read) meets it. After the switch, a majority of ``S`` holds the joint
  record or later ones: a taker that reached a majority of ``S`` read at least the joint
  one and needs a majority of ``S'``, where every later renewal is. A taker working from
  an older record fails its compare-and-swap where those majorities intersect. The
  holder counts a joint renewal as fresh on a majority of ``S`` alone (every taker needs
  one), so partners that do not answer yet delay the switch, never the writes. A taker
  takes over the set (and a pending ``joining``) as it found it.

A lease is read strictly (``LEASE_BODY``, body version 2): a missing or mistyped field
makes it unreadable, never a default. An unreadable newest lease refuses the mount
unless ``--takeover`` is given (then it is waited out like a silent holder). Unknown
keys are ignored, so that a later version may add some.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from fluidfs.peers.rootrecord import CALL_TIMEOUT, Held, RecordClient, seal
from fluidfs.wire import IGNORE, Bytes, Int, List, Map, OneOf, SchemaError, Str, validate

log = logging.getLogger(__name__)

DEFAULT_RENEW = 5.0
FRESH_FACTOR = 3  # the holder acknowledges writes this many renewal intervals on
MAX_HOLDERS = 64
POLL = 1.0  # seconds between looks while waiting for a handover (at most)
REQUEST_TRIES = 5  # asks for a handover that lost a race with a renewal, at most
REQUEST_PAUSE = 0.2
FIRST_TAKE_WAIT = 20.0  # s a new backup's first lease waits for a peer to keep our records
FIRST_TAKE_PAUSE = 0.5


def margin(bound: float) -> float:
    """What a taker waits past the holder's *bound*: clock rate drift between two
    machines and scheduling delays, never less than 2 s."""
    return max(2.0, bound / 5)


class LeaseHeld(Exception):
    """Another machine holds the writer lease (or its lease cannot be read)."""


class NoPeerAnswered(LeaseHeld):
    """No peer answered at all: nobody can say whether a lease exists."""


class LeaseUnreadable(Exception):
    """The newest lease verifies as ours but its body does not fit ``LEASE_BODY``."""

    def __init__(self, seq: int, why: str) -> None:
        super().__init__(f"the newest writer lease (seq {seq}) cannot be read: {why}")
        self.seq = seq


class Renewal(enum.Enum):
    """What a renewal found."""

    RENEWED = "renewed"  # a majority of the holders stored it
    NO_QUORUM = "no quorum"  # too few holders answered or agreed: not fresher
    HANDOVER = "handover"  # another mount asks us to hand over
    TAKEN = "taken"  # another mount holds it now


U64 = Int(0, 2**64 - 1)
BODY_VERSION = 2

#: The decrypted body of a ``lease`` record (``kind`` and ``seq`` are checked against
#: the record's header by rootrecord.open_record).
LEASE_BODY = Map(
    {
        "kind": OneOf("lease"),
        "seq": U64,
        "v": OneOf(BODY_VERSION),
        "time": U64,  # ns
        "machine": Bytes(1, 64),
        "host": Str(1024),
        "mount": Str(4096),
        "pid": U64,
        "addr": Str(300),
        "ttl": U64,  # seconds: the bound, rounded up (for messages)
        "bound_ms": U64,  # the holder's freshness bound
        "holders": List(Bytes(32, 32), max_len=MAX_HOLDERS, min_len=1),
        "state": OneOf("held", "released", "handover"),
    },
    optional={
        "by_machine": Bytes(1, 64), "by_host": Str(1024),  # who asks a handover
        "joining": List(Bytes(32, 32), max_len=MAX_HOLDERS, min_len=1),  # S' of a re-forming
    },
    extra=IGNORE,
)


@dataclass
class LeaseInfo:
    """A lease as found on the peers."""

    seq: int
    machine: bytes
    host: str
    mount: str
    pid: int
    time: float
    ttl: float
    state: str
    fence: int = 0
    bound: float = 0.0
    holders: tuple[bytes, ...] = ()
    by_machine: bytes = b""
    by_host: str = ""
    joining: tuple[bytes, ...] = ()  # the set being re-formed toward (see module docstring)

    @classmethod
    def of(cls, seq: int, body: dict[str, Any], fence: int = 0) -> LeaseInfo:
        """The lease in a record's decrypted *body*; ``SchemaError`` unless every field
        is there with its type."""
        b = validate(LEASE_BODY, body, "lease")
        return cls(
            seq, b["machine"], b["host"], b["mount"], b["pid"], b["time"] / 1e9,
            float(b["ttl"]), b["state"], fence, b["bound_ms"] / 1000,
            tuple(dict.fromkeys(b["holders"])), b.get("by_machine", b""), b.get("by_host", ""),
            tuple(dict.fromkeys(b.get("joining", ()))),
        )

    def live(self, now: float | None = None) -> bool:
        """Held (or asked to hand over) and renewed within its bound, by its wall clock."""
        now = time.time() if now is None else now
        return self.state != "released" and now < self.time + self.ttl

    def where(self) -> str:
        """Where the lease holder is mounted, for messages."""
        return f"host {self.host} at {self.mount} (pid {self.pid})"


@dataclass
class Look:
    """The lease records the holders (and other reachable peers) hold."""

    each: dict[bytes, Held | None]  # peer -> its verified record (None: none)
    newest: Held | None
    info: LeaseInfo | None  # the newest, read (None if none, or unreadable)
    unreadable: str = ""

    def expect(self) -> dict[bytes, int]:
        """The compare-and-swap condition for each peer: the seq it holds (0: none)."""
        return {k: (h.seq if h is not None else 0) for k, h in self.each.items()}


def majority(holders: int) -> int:
    """How many of *holders* make a majority."""
    return holders // 2 + 1


def quorum(stored: set[bytes], holders: tuple[bytes, ...], joining: tuple[bytes, ...]) -> bool:
    """*stored* holds a majority of *holders* and, while re-forming, of *joining* too."""
    if len(stored & set(holders)) < majority(len(holders)):
        return False
    return not joining or len(stored & set(joining)) >= majority(len(joining))


def reformed(holders: tuple[bytes, ...], partners: list[bytes]) -> tuple[bytes, ...]:
    """The holder set to move toward: the holders still partners (in their order), then
    the other partners, at most ``MAX_HOLDERS``; *holders* unchanged with no partners."""
    if not partners:
        return holders
    live = set(partners)
    kept = [k for k in holders if k in live]
    new = sorted(live - set(kept))
    return tuple((kept + new)[:MAX_HOLDERS])


class WriterLease:
    """This mount's side of the lease."""

    def __init__(
        self,
        client: RecordClient,
        machine: bytes,
        mount: str,
        *,
        renew: float = DEFAULT_RENEW,
        addr_of: Callable[[], str] = lambda: "",
        partners: Callable[[], list[bytes]] = lambda: [],
    ) -> None:
        self.client = client
        self.machine = machine
        self.mount = mount
        self.renew = renew
        self.bound = renew * FRESH_FACTOR
        # A renewal must end well within the bound, so a silent peer costs it this much.
        self.call_timeout = min(CALL_TIMEOUT, max(renew, 1.0))
        self.addr_of = addr_of
        self.partners = partners  # peers with a live agreement: the holders to be
        self.seq = 0
        self.fence = 0
        self.holders: tuple[bytes, ...] = ()
        self.joining: tuple[bytes, ...] = ()  # S' while re-forming the holder set
        self.fresh_until = -math.inf  # trio clock: acknowledge writes until then
        self.taken = False  # another mount took the lease over: we stopped writing
        self.lost: LeaseInfo | None = None  # who took it over (None if unreadable)
        self.asked_by: LeaseInfo | None = None  # the handover request seen
        self.published = 0  # holders that stored our latest lease
        self.stored: list[bytes] = []  # which of them stored the lease when we took it

    def _body(self, state: str, **extra: Any) -> dict:
        return {
            "v": BODY_VERSION,
            "time": time.time_ns(),
            "machine": self.machine,
            "host": socket.gethostname(),
            "mount": self.mount,
            "pid": os.getpid(),
            "addr": self.addr_of(),
            "ttl": math.ceil(self.bound),
            "bound_ms": int(self.bound * 1000),
            "holders": list(self.holders),
            "state": state,
            **({"joining": list(self.joining)} if self.joining else {}),
            **extra,
        }

    def members(self) -> tuple[bytes, ...]:
        """Every peer a change of the lease goes to: the holders and any joining."""
        return tuple(dict.fromkeys(self.holders + self.joining))

    def fresh(self) -> bool:
        """True while this mount may acknowledge writes (see the module docstring)."""
        return not self.taken and trio.current_time() < self.fresh_until

    def renewed_within(self, seconds: float) -> bool:
        """True if our last renewal that reached a majority started less than *seconds*
        ago and nothing since showed the lease taken."""
        return not self.taken and trio.current_time() < self.fresh_until - self.bound + seconds

    async def look(self, holders: tuple[bytes, ...] = ()) -> Look:
        """Read the lease from *holders* and every peer we would ask."""
        keys = sorted(set(holders) | set(self.client.targets()))
        each = await self.client.read_each("lease", keys, timeout=self.call_timeout)
        found = [h for h in each.values() if h is not None]
        newest = max(found, key=lambda h: (h.fence, h.seq), default=None)
        if newest is None:
            return Look(each, None, None)
        try:
            return Look(each, newest, LeaseInfo.of(newest.seq, newest.body, newest.fence))
        except SchemaError as exc:
            return Look(each, newest, None, str(exc))

    async def current(self) -> LeaseInfo | None:
        """The newest lease on the reachable peers (None if none answered or none exists);
        ``LeaseUnreadable`` if it does not fit the lease schema."""
        seen = await self.look(self.members())
        if seen.unreadable:
            assert seen.newest is not None
            raise LeaseUnreadable(seen.newest.seq, seen.unreadable)
        return seen.info

    async def acquire(
        self,
        *,
        takeover: bool,
        on_wait: Callable[[float, LeaseInfo | None], None] = lambda left, holder: None,
        seen: Look | None = None,
    ) -> LeaseInfo | None:
        """Take the lease; return the one replaced. Raises ``LeaseHeld`` when another live
        mount holds it (without *takeover*) or when no majority of its holders agrees.

        A lease another machine holds is asked to hand over, then waited for (its bound
        plus the margin) with ``on_wait(seconds left, holder)`` called about every second.
        *seen* is a ``look`` the caller made beside other work (of every peer we would
        ask now), saving that round: taking the lease is a compare-and-swap on what it
        saw. It can be older than the holders' state by the time we take (peers still
        connecting, a provider answering for them), so a take refused on it is tried
        once more on a look of our own.
        """
        if seen is not None:
            try:
                return await self._acquire(takeover, on_wait, seen)
            except LeaseHeld:
                log.info("the lease look given was out of date: looking again")
        return await self._acquire(takeover, on_wait, await self.look())

    async def _acquire(
        self,
        takeover: bool,
        on_wait: Callable[[float, LeaseInfo | None], None],
        seen: Look,
    ) -> LeaseInfo | None:
        held = seen.info
        if seen.unreadable:
            assert seen.newest is not None
            if not takeover:
                raise LeaseHeld(f"{LeaseUnreadable(seen.newest.seq, seen.unreadable)}; "
                                "mount with --takeover to replace it")
            log.warning("replacing an unreadable writer lease: %s", seen.unreadable)
        if held is not None and held.machine != self.machine and held.live() and not takeover:
            ago = max(0, int(time.time() - held.time))
            raise LeaseHeld(
                f"this keyfile is mounted on {held.where()}, lease renewed {ago} s ago; "
                "unmount it there, wait for its lease to expire "
                f"({int(held.ttl)} s after its last renewal), or mount with --takeover"
            )
        if seen.newest is None:
            answered = sorted(seen.each)
            if not answered:
                raise NoPeerAnswered("no peer answered: the writer lease cannot be taken")
            self.holders, self.joining = tuple(answered[:MAX_HOLDERS]), ()
            return await self._take_first(seen)
        if held is not None:
            self.holders, self.joining = held.holders, held.joining
        else:  # unreadable: keep to the peers that hold it
            self.holders = tuple(sorted(k for k, h in seen.each.items() if h is not None))
            self.joining = ()
        if held is not None and (held.state == "released" or held.machine == self.machine):
            return await self._take(seen, held, seen.newest.fence)
        seen = await self._ask_handover(seen, held, on_wait)
        return await self._take(seen, held, seen.newest.fence if seen.newest else 0)

    async def _ask_handover(
        self, seen: Look, held: LeaseInfo | None, on_wait: Callable[[float, LeaseInfo | None], None]
    ) -> Look:
        """Write the handover request, then wait for the release or the bound; the look
        to take the lease over from."""
        assert seen.newest is not None
        fence = seen.newest.fence
        if held is not None:
            body = {k: v for k, v in seen.newest.body.items() if k not in ("kind", "seq")}
            body |= {"state": "handover", "by_machine": self.machine,
                     "by_host": socket.gethostname()}
            bound = held.bound
        else:
            body = self._body("handover", by_machine=self.machine, by_host=socket.gethostname())
            bound = self.bound  # nothing readable says otherwise: wait our own
        for _ in range(REQUEST_TRIES):
            started = trio.current_time()
            agreed = await self._put(seen, body, seen.newest.seq + 1, fence)
            stored = len(agreed)
            if quorum(set(agreed), self.holders, self.joining):
                break
            # The holder renewed between our look and our request (or holders are away):
            # look again and ask on top of what is there now.
            await trio.sleep(REQUEST_PAUSE)
            seen = await self.look(self.members())
            if seen.newest is None or seen.newest.fence != fence:
                raise LeaseHeld("the writer lease changed hands while we asked for it")
        else:
            raise LeaseHeld(self._no_majority("ask the writer to hand over", stored))
        if held is not None:
            log.warning("asked %s to hand over the writer lease", held.where())
        deadline = started + bound + margin(bound)
        while True:
            seen = await self.look(self.members())
            now = seen.info
            if now is not None and seen.newest is not None and seen.newest.fence > fence:
                raise LeaseHeld(f"the writer lease was taken meanwhile by {now.where()}")
            if now is not None and now.state == "released":
                log.info("the writer on %s handed over", now.host)
                return seen
            left = deadline - trio.current_time()
            if left <= 0:
                log.warning("the writer did not hand over within %.0f s: taking the lease",
                            bound + margin(bound))
                return seen
            on_wait(left, held)
            await trio.sleep(min(POLL, left))

    async def _put(self, seen: Look, body: dict, seq: int, fence: int) -> list[bytes]:
        """Compare-and-swap on the holders; those that stored it."""
        raw = seal(self.client.keyring, "lease", seq, body, fence)
        results = await self.client.put_each(
            "lease", raw, list(self.members()), seen.expect(), timeout=self.call_timeout
        )
        return sorted(k for k, r in results.items() if r.stored)

    async def _take_first(self, seen: Look) -> None:
        """The keyfile's first lease. Peers that answered but keep no records for us (no
        agreement yet) are no holders: the set shrinks to those that stored it, and a
        renewal writes that set into the lease."""
        deadline = trio.current_time() + FIRST_TAKE_WAIT
        while True:
            try:
                await self._take(seen, None, 0)
                return
            except LeaseHeld:
                seen = await self.look()
                others = [h for h in seen.each.values()
                          if h is not None and h.body.get("machine") != self.machine]
                if others:  # another first mount raced us: it won
                    raise
                if self.stored:
                    break
                # Nobody stored it: the peers answered before our first agreements were
                # made (they are proposed as peers connect), so none keeps records for
                # us yet. Refusing the mount here made a new user's first mount fail at
                # random; it waits for the agreements instead, bounded.
                if trio.current_time() >= deadline or seen.newest is not None:
                    raise
            await trio.sleep(FIRST_TAKE_PAUSE)
        self.holders, self.joining = tuple(self.stored), ()
        if await self.renew_now() is not Renewal.RENEWED:
            raise LeaseHeld(self._no_majority("take the writer lease", self.published))

    async def _take(self, seen: Look, held: LeaseInfo | None, fence: int) -> LeaseInfo | None:
        started = trio.current_time()
        newest = seen.newest.seq if seen.newest is not None else 0
        self.fence = fence + 1
        self.seq = newest + 1
        self.stored = await self._put(seen, self._body("held"), self.seq, self.fence)
        self.published = len(self.stored)
        if not quorum(set(self.stored), self.holders, self.joining):
            raise LeaseHeld(self._no_majority("take the writer lease", self.published))
        self.fresh_until = started + self.bound
        self.taken, self.lost, self.asked_by = False, None, None
        if held is not None and held.machine != self.machine and held.state != "released":
            log.warning("took over the writer lease from %s (fence %d)", held.where(),
                        self.fence)
        return held

    def _no_majority(self, what: str, stored: int) -> str:
        also = (f", and a majority of the {len(self.joining)} it is moving to"
                if self.joining else "")
        return (
            f"could not {what}: {stored} of its {len(self.holders)} holders agreed and "
            f"{majority(len(self.holders))} must{also} (another mount changed it meanwhile, "
            "or too few of them are reachable); mount again later"
        )

    async def renew_now(self) -> Renewal:
        """Renew the lease by compare-and-swap on the holders (see ``Renewal``), re-forming
        the holder set toward our partners while the lease is fresh."""
        if self.taken:
            return Renewal.TAKEN
        started = trio.current_time()
        if self.fresh():
            self._aim()
        holders, joining = self.holders, self.joining
        seq = self.seq + 1
        raw = seal(self.client.keyring, "lease", seq, self._body("held"), self.fence)
        members = self.members()
        expect = {k: self.seq for k in members}
        results = await self.client.put_each(
            "lease", raw, list(members), expect, timeout=self.call_timeout
        )
        # A holder that missed one of our renewals still holds ours, and a joining one
        # may hold none yet (or a replaced writer's): swap from what it holds.
        behind = {k: at for k, r in results.items()
                  if not r.stored and (at := self._swap_from(r.held, seq)) is not None}
        if behind:
            again = await self.client.put_each(
                "lease", raw, sorted(behind), behind, timeout=self.call_timeout
            )
            results |= again
        self.seq = seq
        agreed = {k for k, r in results.items() if r.stored}
        stored = len(agreed)
        self.published = stored
        refused = [r.held for r in results.values() if not r.stored and r.held is not None]
        later = [h for h in refused if h.fence > self.fence]
        if later:
            self._taken(max(later, key=lambda h: (h.fence, h.seq)))
            return Renewal.TAKEN
        if quorum(agreed, holders, ()):
            # A request on fewer holders than that did not reach its majority: the asker
            # gave up or asks again on top of this renewal. (Every taker needs a majority
            # of the current holders, joint or not: that alone makes us fresh.)
            self.fresh_until = started + self.bound
            if joining and quorum(agreed, joining, ()):
                log.info("the writer lease moves to %d holders (from %d)", len(joining),
                         len(holders))
                self.holders, self.joining = joining, ()
            return Renewal.RENEWED
        for held in refused:
            if held.fence == self.fence and held.body.get("state") == "handover":
                try:
                    self.asked_by = LeaseInfo.of(held.seq, held.body, held.fence)
                except SchemaError:
                    self.asked_by = None
                return Renewal.HANDOVER
        log.warning("lease renewal reached %d of %d holders (%d needed)",
                    len(agreed & set(holders)), len(holders), majority(len(holders)))
        return Renewal.NO_QUORUM

    def _aim(self) -> None:
        """Set ``joining`` to the set our partners make, or clear it when that is the
        holder set already (safe at any time before the switch: every record we write
        until then is on a majority of the holders)."""
        target = reformed(self.holders, self.partners())
        self.joining = () if set(target) == set(self.holders) else target

    def _swap_from(self, held: Held | None, seq: int) -> int | None:
        """The seq to compare-and-swap from on a peer that refused our renewal holding
        *held*; None if we must not (another writer's lease, or a handover request)."""
        if held is None:
            return 0  # it holds nothing of ours that verifies: a joining peer
        if self._ours(held):
            return held.seq
        if held.fence < self.fence and held.seq < seq:
            return held.seq  # a replaced writer's lease: it can change nothing any more
        return None

    def _ours(self, held: Held) -> bool:
        return (
            held.fence == self.fence
            and held.body.get("machine") == self.machine
            and held.body.get("state") == "held"
            and held.seq < self.seq + 1
        )

    def _taken(self, held: Held | None) -> None:
        self.taken, self.fresh_until = True, -math.inf
        try:
            self.lost = LeaseInfo.of(held.seq, held.body, held.fence) if held else None
        except SchemaError:
            self.lost = None
        log.error("the writer lease was taken over by %s: this mount stops writing",
                  self.lost.where() if self.lost else "another mount")

    def fenced(self) -> bool:
        """A record of a later writer was seen: we have been replaced."""
        if not self.taken and self.client.fence_seen > self.fence:
            self._taken(None)
        return self.taken

    async def check(self) -> bool:
        """Renew now; False once another machine has taken the lease (``lost`` set if it
        can be read). A request to hand over counts as taken here."""
        outcome = await self.renew_now()
        if outcome is Renewal.HANDOVER:
            self.taken, self.fresh_until, self.lost = True, -math.inf, self.asked_by
        return outcome in (Renewal.RENEWED, Renewal.NO_QUORUM)

    async def release(self) -> int:
        """Give the lease up under our fence (clean unmount, or the end of a handover);
        how many holders stored the release."""
        if not self.seq or (self.taken and self.asked_by is None):
            return 0
        seen = await self.look(self.members())
        if seen.newest is None or seen.newest.fence != self.fence:
            return 0  # someone else's by now
        mine = {k: h for k, h in seen.each.items() if h is not None and h.fence == self.fence}
        seen = Look(mine, seen.newest, seen.info)
        self.seq = seen.newest.seq + 1
        stored = len(await self._put(seen, self._body("released"), self.seq, self.fence))
        self.fresh_until = -math.inf
        return stored
