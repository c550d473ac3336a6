"""Storage agreements: what each side promised to host for the other, and what is used.

Stored in ``meta.lmdb`` table ``agreements`` (format version 1): key
``peer public key(32)`` → CBOR map ``{"v": 1, "we_host": int, "they_host": int,
"they_use": int, "term": int, "created": float, "renewed": float,
"store_at": str | None, "failing_since": float | None, "ended_at": float | None,
"notified": bool}``. Fields added later default when absent, so older records load.

``we_host`` is the promise we made (bytes we keep for the peer); ``they_host``
the promise they made to us; ``they_use`` the bytes of ours they hold, as we
count them. The bytes we hold for them are counted by the shard store itself.

Lifecycle: ``failing_since`` is when the peer first failed verification (or could
not be reached) with no success since; past the tolerance the agreement ends
(``ended_at``) on our side and the peer is told (``notified``). An ended
agreement takes no new shards either way; what we host for the peer is kept for
the keep period after the end, then dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import cbor2

from fluidfs.store.db import Database

VERSION = 1
DEFAULT_TERM = 24 * 3600


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
    failing_since: float | None = None
    ended_at: float | None = None
    notified: bool = False

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
    """All agreements of this node, persisted in LMDB and mirrored in memory."""

    def __init__(self, db: Database) -> None:
        self.db = db
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

    def active(self) -> list[Agreement]:
        """Agreements that have not ended."""
        return [a for a in self.agreements.values() if a.active]

    def promised_by_us(self, excluding: bytes | None = None) -> int:
        """Total bytes we have promised to host, over all live agreements."""
        return sum(a.we_host for a in self.active() if a.peer != excluding)

    def record(
        self, peer: bytes, we_host: int, they_host: int, term: int, store_at: str | None = None
    ) -> Agreement:
        """Make or renew the agreement with *peer*."""
        now = time.time()
        agreement = self.agreements.get(peer)
        if agreement is None:
            agreement = Agreement(peer, created=now)
            self.agreements[peer] = agreement
        agreement.we_host = we_host
        agreement.they_host = they_host
        agreement.term = term
        agreement.renewed = now
        agreement.store_at = store_at
        agreement.failing_since = None
        agreement.ended_at = None
        agreement.notified = False
        self.save(agreement)
        return agreement

    def passed(self, peer: bytes) -> None:
        """The peer passed verification: the agreement renews."""
        agreement = self.agreements.get(peer)
        if agreement is not None and agreement.active:
            agreement.failing_since = None
            agreement.renewed = time.time()

    def failed(self, peer: bytes) -> None:
        """The peer failed verification (or was unreachable)."""
        agreement = self.agreements.get(peer)
        if agreement is not None and agreement.active and agreement.failing_since is None:
            agreement.failing_since = time.time()

    def mark_ended(self, peer: bytes, *, notified: bool = False) -> Agreement | None:
        """End the agreement (both directions); return it if it was live."""
        agreement = self.agreements.get(peer)
        if agreement is None or not agreement.active:
            return None
        agreement.ended_at = time.time()
        agreement.notified = notified
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
