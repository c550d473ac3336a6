"""Storage agreements: what each side promised to host for the other, and what is used.

Stored in ``meta.lmdb`` table ``agreements`` (format version 1): key
``peer public key(32)`` → CBOR map ``{"v": 1, "we_host": int, "they_host": int,
"they_use": int, "term": int, "created": float, "renewed": float,
"store_at": str | None, "store_at_id": bytes | None, "reserved_at": bytes | None,
"failing_since": float | None, "ended_at": float | None,
"notified": bool, "ended_by_us": bool, "unclaimed_since": float | None}``. Fields added
later default when absent, so older records load (``ended_by_us``, ``unclaimed_since``,
``store_at_id`` and ``reserved_at`` were added in the same version: absent means false /
None).

Storage providers (docs/federation.md): ``store_at`` / ``store_at_id`` are the address and
id of the provider the peer (the proposer) asked us to send its side's shard ops to;
``reserved_at`` is the id of our own provider, where we reserved space for the peer.

``we_host`` is the promise we made (bytes we keep for the peer); ``they_host``
the promise they made to us; ``they_use`` the bytes of ours they hold, as we
count them. The bytes we hold for them are counted by the shard store itself.

Lifecycle: ``failing_since`` is when the peer first failed verification (or could
not be reached) with no success since; past the tolerance the agreement ends
(``ended_at``) on our side and the peer is told (``notified``). An ended
agreement takes no new shards either way; what we host for the peer is kept for
the keep period after the end, then dropped. An agreement *we* ended (``ended_by_us``:
the peer failed verification too long) cannot be revived by a proposal until its
cool-down has passed, and a proposal never clears a live agreement's failure clock.
A new agreement that follows an ended one carries the old end time (``unclaimed_since``):
the shards still kept from the old one are dropped a keep period after that end unless
the owner re-claims them meanwhile (store/shards.py, peers/lifecycle.py).

Terms (``TermsPolicy``, limits in docs/protocol.md §5): an acceptor grants at least
``min_bytes`` each way, at most a trust-scaled share of its donation to one peer, a
bounded number of new agreements per hour, and keeps a bounded number of agreements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import cbor2

from fluidfs.store.db import Database

VERSION = 1
DEFAULT_TERM = 24 * 3600
MIB = 1 << 20


@dataclass(frozen=True)
class TermsPolicy:
    """Limits on the agreements this node makes (values and reasons: docs/protocol.md §5)."""

    min_bytes: int = MIB  # floor on both offer and ask of a proposal
    stranger_share: int = 16  # a peer of initial trust is granted at most donate/16 ...
    max_share: int = 4  # ... scaled by its trust, but never more than donate/4
    min_trust: float = 0.5  # proposals from peers below half the initial trust are refused
    new_per_hour: int = 32  # new agreements granted per hour (a burst of as many)
    max_agreements: int = 256  # live agreements
    max_ended: int = 1024  # ended agreements remembered (for cool-downs and keep periods)
    idle_grace: float = 3600.0  # a live agreement holding nothing this long may be evicted

    def cap(self, donate: int, trust_factor: float) -> int:
        """Most we host for one peer whose trust is *trust_factor* times the initial one."""
        share = donate // self.stranger_share * max(1.0, trust_factor)
        return min(donate, max(self.min_bytes, min(int(share), donate // self.max_share)))


@dataclass
class Agreement:
    """A reciprocal storage agreement with one peer."""

    peer: bytes
    we_host: int = 0
    they_host: int = 0
    they_use: int = 0
    term: int = DEFAULT_TERM
    created: float = 0.0
    renewed: float = 0.0
    store_at: str | None = None
    store_at_id: bytes | None = None
    reserved_at: bytes | None = None
    failing_since: float | None = None
    ended_at: float | None = None
    notified: bool = False
    ended_by_us: bool = False
    unclaimed_since: float | None = None  # the previous agreement's end (see above)

    @property
    def active(self) -> bool:
        """True until the agreement ends."""
        return self.ended_at is None

    @property
    def room(self) -> int:
        """Bytes of ours the peer has promised and not yet been given."""
        if not self.active:
            return 0
        return max(0, self.they_host - self.they_use)

    def encode(self) -> bytes:
        """CBOR, version 1."""
        body = asdict(self)
        del body["peer"]
        return cbor2.dumps({"v": VERSION, **body})

    @classmethod
    def decode(cls, peer: bytes, raw: bytes) -> Agreement:
        """Parse what encode() wrote."""
        body = cbor2.loads(raw)
        if body.pop("v", None) != VERSION:
            raise ValueError("unknown agreement record version")
        return cls(peer=bytes(peer), **body)


class Ledger:
    """All agreements of this node, persisted in LMDB and mirrored in memory.

    Its times (created, renewed, failing since, ended at) are read from *clock*, the wall
    clock unless a test passes its own.
    """

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._db = db["agreements"]
        self.agreements: dict[bytes, Agreement] = {}
        with db.read() as txn:
            for key, raw in txn.cursor(db=self._db):
                agreement = Agreement.decode(key, raw)
                self.agreements[agreement.peer] = agreement

    def __iter__(self) -> Iterator[Agreement]:
        return iter(list(self.agreements.values()))

    def __len__(self) -> int:
        return len(self.agreements)

    def get(self, peer: bytes) -> Agreement | None:
        """The agreement with *peer*, or None."""
        return self.agreements.get(peer)

    def live(self, peer: bytes) -> Agreement | None:
        """The agreement with *peer* if it has not ended (the peer is a partner), or None."""
        agreement = self.agreements.get(peer)
        return agreement if agreement is not None and agreement.active else None

    def active(self) -> list[Agreement]:
        """Agreements that have not ended."""
        return [a for a in self.agreements.values() if a.active]

    def promised_by_us(self, excluding: bytes | None = None) -> int:
        """Total bytes we have promised to host, over all live agreements."""
        return sum(a.we_host for a in self.active() if a.peer != excluding)

    def record(
        self,
        peer: bytes,
        we_host: int,
        they_host: int,
        term: int,
        store_at: tuple[bytes, str] | None = None,
        reserved_at: bytes | None = None,
    ) -> Agreement:
        """Make the agreement with *peer*, renew a live one, or start over after an end.

        Renewing a live agreement changes its terms only: a failure clock that is running
        keeps running (only verification passing stops it). Whether an ended agreement may
        start over (its cool-down) is for the caller to decide. *store_at*: (id, address)
        of the provider holding the peer's side; *reserved_at*: our provider's id.
        """
        now = self.clock()
        agreement = self.agreements.get(peer)
        if agreement is None or not agreement.active:
            before = agreement.ended_at if agreement is not None else None
            agreement = Agreement(peer, created=now, unclaimed_since=before)
            self.agreements[peer] = agreement
        agreement.we_host = we_host
        agreement.they_host = they_host
        agreement.term = term
        agreement.renewed = now
        agreement.store_at_id, agreement.store_at = store_at or (None, None)
        agreement.reserved_at = reserved_at
        self.save(agreement)
        return agreement

    def ended(self) -> list[Agreement]:
        """Agreements that have ended and are still remembered."""
        return [a for a in self.agreements.values() if not a.active]

    def in_cooldown(self, peer: bytes, cooldown: float, now: float | None = None) -> float:
        """Seconds left before an agreement we ended with *peer* may start again (0: none)."""
        agreement = self.agreements.get(peer)
        if agreement is None or agreement.active or not agreement.ended_by_us:
            return 0.0
        left = agreement.ended_at + cooldown - (self.clock() if now is None else now)
        return max(0.0, left)

    def evictable(
        self, held: dict[bytes, int], *, ended: bool, idle_since: float | None = None
    ) -> list[bytes]:
        """Peers whose agreement can be forgotten to make room, least useful first.

        *held* maps owners to the bytes we keep for them. With *ended*, ended agreements
        holding nothing here and nothing of ours (oldest end first; those still in a
        cool-down we imposed last). Otherwise live ones holding nothing either way,
        last renewed before *idle_since* (oldest first).
        """
        if ended:
            found = [
                a for a in self.agreements.values()
                if not a.active and not held.get(a.peer) and not a.they_use
            ]
            found.sort(key=lambda a: (a.ended_by_us, a.ended_at))
        else:
            limit = self.clock() if idle_since is None else idle_since
            found = [
                a for a in self.agreements.values()
                if a.active and not held.get(a.peer) and not a.they_use and a.renewed < limit
            ]
            found.sort(key=lambda a: a.renewed)
        return [a.peer for a in found]

    def store_at_of(self, peer: bytes) -> tuple[bytes, str] | None:
        """(id, address) of the provider holding *peer*'s side of our agreement, if any."""
        agreement = self.agreements.get(peer)
        if agreement is None or agreement.store_at_id is None or not agreement.store_at:
            return None
        return agreement.store_at_id, agreement.store_at

    def passed(self, peer: bytes) -> None:
        """The peer passed verification: the agreement renews."""
        agreement = self.agreements.get(peer)
        if agreement is not None and agreement.active:
            agreement.failing_since = None
            agreement.renewed = self.clock()

    def failed(self, peer: bytes) -> None:
        """The peer failed verification (or was unreachable)."""
        agreement = self.agreements.get(peer)
        if agreement is not None and agreement.active and agreement.failing_since is None:
            agreement.failing_since = self.clock()

    def mark_ended(
        self, peer: bytes, *, notified: bool = False, by_us: bool = False
    ) -> Agreement | None:
        """End the agreement (both directions); return it if it was live.

        *by_us*: we ended it because the peer failed (it starts a cool-down).
        """
        agreement = self.agreements.get(peer)
        if agreement is None or not agreement.active:
            return None
        agreement.ended_at = self.clock()
        agreement.notified = notified
        agreement.ended_by_us = by_us
        self.save(agreement)
        return agreement

    def add_use(self, peer: bytes, delta: int) -> None:
        """Count bytes of ours that *peer* now holds (negative when deleted)."""
        agreement = self.agreements.get(peer)
        if agreement is not None:
            agreement.they_use = max(0, agreement.they_use + delta)

    def save(self, agreement: Agreement) -> None:
        """Persist one agreement."""
        with self.db.write() as txn:
            txn.put(agreement.peer, agreement.encode(), db=self._db)

    def save_all(self) -> None:
        """Persist every agreement (usage counters change often; written in batches)."""
        with self.db.write() as txn:
            for agreement in self.agreements.values():
                txn.put(agreement.peer, agreement.encode(), db=self._db)

    def end(self, peer: bytes) -> None:
        """Forget the agreement with *peer*."""
        if self.agreements.pop(peer, None) is not None:
            with self.db.write() as txn:
                txn.delete(peer, db=self._db)
