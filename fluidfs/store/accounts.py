"""A storage provider's books: its customers' accounts and the reservations they made.

Stored in ``meta.lmdb`` (format version 1), written only by a provider node and by its
operator's ``fluidfs provider`` command (another process: LMDB serialises the writers,
and the node reads the tables afresh on every check, never from a copy in memory):

- table ``accounts``: key ``customer public key(32)`` → CBOR
  ``{"v": 1, "quota": int, "added": float}``: the bytes of reservations the customer may
  hold in all, and when the operator admitted it.
- table ``reservations``: key ``customer(32) || peer(32)`` → CBOR
  ``{"v": 1, "size": int, "made": float, "removed": float | None}``: space the customer
  reserved for one of its partners' shards (``docs/federation.md``). A removed
  reservation takes no new shards; what it holds is kept for the keep period after
  ``removed``, then dropped with the reservation.

The shards themselves are in the shard store under an owner key of their own per
reservation (``holder_key``), so they never mix with shards the peer stores with this
node under an agreement of its own.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import cbor2

from fluidfs.store.db import Database
from fluidfs.wire.schema import Int, Map, OneOf, Schema, validate

VERSION = 1
MAX_RESERVATIONS = 1024  # per customer: its partners, with room for ended ones
_HOLDER_CONTEXT = b"fluidfs reservation holder v1"

_TIME = Int(0, 2**53)
ACCOUNT_SCHEMA: Schema = Map({"v": OneOf(VERSION), "quota": Int(0, 2**63), "added": _TIME})
RESERVATION_SCHEMA: Schema = Map(
    {"v": OneOf(VERSION), "size": Int(0, 2**63), "made": _TIME},
    optional={"removed": _TIME},
)


def holder_key(customer: bytes, peer: bytes) -> bytes:
    """The shard-store owner key of the shards *peer* stores under *customer*'s
    reservation (a hash, so no peer identity can collide with it)."""
    return hashlib.blake2b(_HOLDER_CONTEXT + customer + peer, digest_size=32).digest()


@dataclass(frozen=True)
class Account:
    """A customer the operator admitted, with its quota in bytes."""

    customer: bytes
    quota: int
    added: float


@dataclass(frozen=True)
class Reservation:
    """Space *customer* reserved here for the shards of its partner *peer*."""

    customer: bytes
    peer: bytes
    size: int
    made: float
    removed: float | None = None

    @property
    def live(self) -> bool:
        """True until the customer (or the operator) removes it."""
        return self.removed is None

    @property
    def holder(self) -> bytes:
        """Its shards' owner key in the shard store."""
        return holder_key(self.customer, self.peer)


class AccountBook:
    """Accounts and reservations in ``meta.lmdb`` (read afresh each time: small
    transactions, microseconds, so the operator's command is seen at once)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._accounts = db["accounts"]
        self._reservations = db["reservations"]

    # --- accounts (the operator) -------------------------------------------------------

    def add(self, customer: bytes, quota: int) -> Account:
        """Admit *customer* with *quota* bytes, or change the quota of one admitted."""
        old = self.account(customer)
        account = Account(customer, quota, old.added if old else int(self.clock()))
        body = {"v": VERSION, "quota": quota, "added": int(account.added)}
        with self.db.write() as txn:
            txn.put(customer, cbor2.dumps(body), db=self._accounts)
        return account

    def remove(self, customer: bytes) -> bool:
        """Close *customer*'s account: its live reservations are removed (their shards
        kept for the keep period). True if there was one."""
        now = int(self.clock())
        with self.db.write() as txn:
            found = txn.delete(customer, db=self._accounts)
            for reservation in self._of(txn, customer):
                if reservation.live:
                    self._put(txn, _removed(reservation, now))
        return found

    def account(self, customer: bytes) -> Account | None:
        """*customer*'s account, or None if the operator never admitted it."""
        with self.db.read() as txn:
            raw = txn.get(customer, db=self._accounts)
        if raw is None:
            return None
        body = validate(ACCOUNT_SCHEMA, cbor2.loads(raw))
        return Account(bytes(customer), body["quota"], float(body["added"]))

    def accounts(self) -> list[Account]:
        """Every account."""
        with self.db.read() as txn:
            keys = [bytes(k) for k, _ in txn.cursor(db=self._accounts)]
        return [a for a in map(self.account, keys) if a is not None]

    # --- reservations (the customers) ----------------------------------------------------

    def reservation(self, customer: bytes, peer: bytes) -> Reservation | None:
        """The reservation *customer* made for *peer* (live or removed), or None."""
        with self.db.read() as txn:
            raw = txn.get(customer + peer, db=self._reservations)
        return None if raw is None else _decode(customer + peer, raw)

    def reservations(self, customer: bytes | None = None) -> list[Reservation]:
        """Every reservation (of one customer, if given)."""
        with self.db.read() as txn:
            if customer is not None:
                return self._of(txn, customer)
            return [_decode(bytes(k), v) for k, v in txn.cursor(db=self._reservations)]

    def reserved(self, customer: bytes, excluding: bytes | None = None) -> int:
        """Bytes of *customer*'s live reservations (all but the one for *excluding*)."""
        return sum(
            r.size for r in self.reservations(customer) if r.live and r.peer != excluding
        )

    def reserve(self, customer: bytes, peer: bytes, size: int) -> Reservation:
        """Make, resize or revive the reservation (the caller checked the quota)."""
        old = self.reservation(customer, peer)
        reservation = Reservation(customer, peer, size, old.made if old else int(self.clock()))
        with self.db.write() as txn:
            self._put(txn, reservation)
        return reservation

    def unreserve(self, customer: bytes, peer: bytes) -> bool:
        """Remove a live reservation (its shards stay for the keep period); True if live."""
        old = self.reservation(customer, peer)
        if old is None or not old.live:
            return False
        with self.db.write() as txn:
            self._put(txn, _removed(old, int(self.clock())))
        return True

    def forget(self, reservation: Reservation) -> None:
        """Drop a removed reservation's entry (its shards are gone)."""
        with self.db.write() as txn:
            txn.delete(reservation.customer + reservation.peer, db=self._reservations)

    def _of(self, txn, customer: bytes) -> list[Reservation]:
        found = []
        cursor = txn.cursor(db=self._reservations)
        if cursor.set_range(customer):
            for key, raw in cursor:
                if bytes(key[:32]) != customer:
                    break
                found.append(_decode(bytes(key), raw))
        return found

    def _put(self, txn, reservation: Reservation) -> None:
        body = {"v": VERSION, "size": reservation.size, "made": int(reservation.made)}
        if reservation.removed is not None:
            body["removed"] = int(reservation.removed)
        txn.put(reservation.customer + reservation.peer, cbor2.dumps(body),
                db=self._reservations)


def _decode(key: bytes, raw: bytes) -> Reservation:
    body = validate(RESERVATION_SCHEMA, cbor2.loads(bytes(raw)))
    removed = body.get("removed")
    return Reservation(bytes(key[:32]), bytes(key[32:]), body["size"], float(body["made"]),
                       None if removed is None else float(removed))


def _removed(reservation: Reservation, now: int) -> Reservation:
    return Reservation(reservation.customer, reservation.peer, reservation.size,
                       reservation.made, float(now))
