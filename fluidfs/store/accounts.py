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

- table ``invites``: key ``blake2b(context || secret)(32)`` → CBOR
  ``{"v": 1, "quota": int, "made": float, "expires": float}``: a one-time invitation
  code the operator made (``fluidfs provider invite``); the node that presents its secret
  before ``expires`` becomes a customer with ``quota`` and the entry is deleted in the
  same transaction. Only the hash is kept: the table does not give the codes away.

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
INVITE_SECRET = 16  # bytes of an invitation code's secret (128 bits: never guessed)
_HOLDER_CONTEXT = b"fluidfs reservation holder v1"
_INVITE_CONTEXT = b"fluidfs provider invitation v1"

_TIME = Int(0, 2**53)
ACCOUNT_SCHEMA: Schema = Map({"v": OneOf(VERSION), "quota": Int(0, 2**63), "added": _TIME})
RESERVATION_SCHEMA: Schema = Map(
    {"v": OneOf(VERSION), "size": Int(0, 2**63), "made": _TIME},
    optional={"removed": _TIME},
)

INVITE_SCHEMA: Schema = Map(
    {"v": OneOf(VERSION), "quota": Int(0, 2**63), "made": _TIME, "expires": _TIME})


class InvitationRefused(Exception):
    """An invitation code that admits nobody: never made here, used, or expired."""


def invite_key(secret: bytes) -> bytes:
    """The ``invites`` key of an invitation's *secret* (a hash: the table holds no code)."""
    return hashlib.blake2b(_INVITE_CONTEXT + secret, digest_size=32).digest()


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
class Invitation:
    """A one-time invitation code not yet redeemed: the quota it admits with, and until
    when."""

    quota: int
    made: float
    expires: float


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
        self._invites = db["invites"]

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

    # --- invitations (the operator makes them, a stranger redeems one) -------------------

    def invite(self, secret: bytes, quota: int, lifetime: float) -> Invitation:
        """Keep an invitation: whoever presents *secret* within *lifetime* seconds is
        admitted with *quota*. Expired invitations are dropped on the way."""
        now = int(self.clock())
        invitation = Invitation(quota, now, now + max(1, round(lifetime)))
        body = {"v": VERSION, "quota": quota, "made": now, "expires": int(invitation.expires)}
        with self.db.write() as txn:
            for key, _ in self._expired(txn, now):
                txn.delete(key, db=self._invites)
            txn.put(invite_key(secret), cbor2.dumps(body), db=self._invites)
        return invitation

    def invitations(self) -> list[Invitation]:
        """The invitations not yet redeemed nor expired."""
        now = self.clock()
        with self.db.read() as txn:
            found = [_invitation(raw) for _, raw in txn.cursor(db=self._invites)]
        return [i for i in found if i.expires > now]

    def redeem(self, secret: bytes, customer: bytes) -> Account:
        """Admit *customer* with the quota of the invitation *secret* opens (an existing
        customer's quota is raised to it, never lowered) and delete the invitation, in
        one transaction: a code admits one node, once. ``InvitationRefused`` if there is
        no such invitation or it has expired (an expired one is deleted)."""
        key = invite_key(secret)
        with self.db.read() as txn:  # strangers' guesses cost a read, never a write
            if txn.get(key, db=self._invites) is None:
                raise InvitationRefused("no such invitation here (used, or never made)")
        now = self.clock()
        with self.db.write() as txn:
            raw = txn.get(key, db=self._invites)
            invitation = None if raw is None else _invitation(raw)
            if invitation is not None:
                txn.delete(key, db=self._invites)
            if invitation is not None and invitation.expires > now:
                old = txn.get(customer, db=self._accounts)
                held = None if old is None else validate(ACCOUNT_SCHEMA, cbor2.loads(old))
                quota = max(invitation.quota, held["quota"] if held else 0)
                added = held["added"] if held else int(now)
                body = {"v": VERSION, "quota": quota, "added": added}
                txn.put(customer, cbor2.dumps(body), db=self._accounts)
        if invitation is None:
            raise InvitationRefused("no such invitation here (used, or never made)")
        if invitation.expires <= now:
            raise InvitationRefused("this invitation has expired")
        return Account(customer, quota, float(added))

    def _expired(self, txn, now: float) -> list[tuple[bytes, Invitation]]:
        found = [(bytes(k), _invitation(raw)) for k, raw in txn.cursor(db=self._invites)]
        return [(k, i) for k, i in found if i.expires <= now]

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


def _invitation(raw: bytes) -> Invitation:
    body = validate(INVITE_SCHEMA, cbor2.loads(bytes(raw)))
    return Invitation(body["quota"], float(body["made"]), float(body["expires"]))


def _removed(reservation: Reservation, now: int) -> Reservation:
    return Reservation(reservation.customer, reservation.peer, reservation.size,
                       reservation.made, float(now))
