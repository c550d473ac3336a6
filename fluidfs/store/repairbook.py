"""A storage provider's books for repairing its customers' blocks (issue 13 item 4).

Stored in the provider's ``meta.lmdb`` (format version 1), written by the provider node:

- table ``repair_grants``: key ``customer(32)`` → CBOR
  ``{"v": 1, "delegation": bytes, "until": int, "peers": [{"id", "addr", "room"}],
  "seen": float, "away": bool}``: the customer's signed delegation
  (peers/delegation.py), the partners it lets us place shards on, each with its address
  and the bytes it may still place there (learnt from the customer, never from the
  partner), when the customer last refreshed it, and whether it said it goes away.
- table ``repair_caps``: key ``customer(32) || block(32)`` → CBOR
  ``{"v": 1, "k", "n", "size", "ids": [id32] * n, "holders": [id32 or b""] * n}``: the
  repair capability of one block: its code, shard size, shard ids and each shard's
  holder (``b""``: none we can reach; such a shard is never re-created here). Never a
  key, a nonce or a plaintext byte.
- table ``repair_usage``: key ``customer(32)`` → u64 big-endian: bytes of its
  capability held (keys and values), counted against ``caps_quota``; key
  ``"seq" || customer(32)`` → u64 big-endian: the last journal number given it.
- table ``repair_journal``: key ``customer(32) || seq(u64 BE)`` → a signed journal
  entry (peers/repairjournal.py), kept until the customer acknowledges it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import cbor2

from fluidfs.store.db import Database
from fluidfs.wire.schema import Bool, Bytes, Int, List, Map, OneOf, Schema, Str, validate

VERSION = 1
TABLES = ["repair_grants", "repair_caps", "repair_usage", "repair_journal"]
MIN_CAPS_QUOTA = 1 << 20  # bytes of capability any customer may keep
CAPS_QUOTA_SHARE = 256  # ... or 1/256 of its account's quota, whichever is more
MAX_JOURNAL = 1 << 20  # unacknowledged entries per customer; repair stops past it
_U64 = struct.Struct(">Q")

ID = Bytes(min=32, max=32)
PEER_ROOM = Map({"id": ID, "addr": Str(min=1, max=300), "room": Int(0, 2**63)})
GRANT_SCHEMA: Schema = Map({
    "v": OneOf(VERSION), "delegation": Bytes(min=1, max=256), "until": Int(0, 2**63),
    "peers": List(PEER_ROOM, max_len=1024), "seen": Int(0, 2**53), "away": Bool(),
})
CAP_SCHEMA: Schema = Map({
    "v": OneOf(VERSION), "k": Int(1, 255), "n": Int(1, 255), "size": Int(1, 2**32),
    "ids": List(ID, max_len=255), "holders": List(Bytes(max=32), max_len=255),
})


def caps_quota(account_quota: int) -> int:
    """Bytes of repair capability a customer with *account_quota* may keep here."""
    return max(MIN_CAPS_QUOTA, account_quota // CAPS_QUOTA_SHARE)


@dataclass(frozen=True)
class PeerRoom:
    """A partner of the customer we may place its shards on, and how much more."""

    key: bytes
    addr: str
    room: int


@dataclass(frozen=True)
class Grant:
    """What a customer lets us do for it (see the module docstring)."""

    customer: bytes
    delegation: bytes
    until: int
    peers: tuple[PeerRoom, ...]
    seen: float
    away: bool


@dataclass
class Capability:
    """One block's repair capability: enough to re-create a shard, nothing to read it."""

    block: bytes
    k: int
    n: int
    size: int  # bytes per shard
    ids: list[bytes]
    holders: list[bytes]  # b"": no holder we can reach

    def encode(self) -> bytes:
        """The table value (version 1)."""
        return cbor2.dumps({"v": VERSION, "k": self.k, "n": self.n, "size": self.size,
                            "ids": self.ids, "holders": self.holders})


def decode_cap(block: bytes, raw: bytes) -> Capability:
    """A table value written by ``Capability.encode``."""
    body = validate(CAP_SCHEMA, cbor2.loads(bytes(raw)))
    return Capability(block, body["k"], body["n"], body["size"],
                      list(body["ids"]), list(body["holders"]))


class _OverQuota(Exception):
    pass


class RepairBook:
    """Grants, capabilities and the journal in ``meta.lmdb`` (blocking: call the scans
    from worker threads)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._grants = db["repair_grants"]
        self._caps = db["repair_caps"]
        self._usage = db["repair_usage"]
        self._journal = db["repair_journal"]

    # --- grants ------------------------------------------------------------------------

    def put_grant(self, customer: bytes, delegation: bytes, until: int,
                  peers: list[PeerRoom]) -> None:
        """Keep the customer's newest grant; it is back (not away) as of now."""
        body = {"v": VERSION, "delegation": delegation, "until": until,
                "peers": [{"id": p.key, "addr": p.addr, "room": p.room} for p in peers],
                "seen": int(self.clock()), "away": False}
        with self.db.write() as txn:
            txn.put(customer, cbor2.dumps(body), db=self._grants)

    def grant(self, customer: bytes) -> Grant | None:
        """The customer's grant, or None."""
        with self.db.read() as txn:
            raw = txn.get(customer, db=self._grants)
        if raw is None:
            return None
        body = validate(GRANT_SCHEMA, cbor2.loads(bytes(raw)))
        peers = tuple(PeerRoom(p["id"], p["addr"], p["room"]) for p in body["peers"])
        return Grant(customer, body["delegation"], body["until"], peers,
                     float(body["seen"]), body["away"])

    def grants(self) -> list[Grant]:
        """Every customer's grant."""
        with self.db.read() as txn:
            keys = [bytes(k) for k, _ in txn.cursor(db=self._grants)]
        return [g for g in map(self.grant, keys) if g is not None]

    def set_away(self, customer: bytes, away: bool) -> bool:
        """Mark the customer away (it unmounted) or back; False if it granted nothing."""
        grant = self.grant(customer)
        if grant is None:
            return False
        body = {"v": VERSION, "delegation": grant.delegation, "until": grant.until,
                "peers": [{"id": p.key, "addr": p.addr, "room": p.room} for p in grant.peers],
                "seen": int(self.clock()), "away": away}
        with self.db.write() as txn:
            txn.put(customer, cbor2.dumps(body), db=self._grants)
        return True

    def spend_room(self, customer: bytes, peer: bytes, used: int) -> None:
        """*used* bytes were placed on *peer*: less room there until the customer says."""
        grant = self.grant(customer)
        if grant is None:
            return
        peers = [PeerRoom(p.key, p.addr, max(0, p.room - used) if p.key == peer else p.room)
                 for p in grant.peers]
        body = {"v": VERSION, "delegation": grant.delegation, "until": grant.until,
                "peers": [{"id": p.key, "addr": p.addr, "room": p.room} for p in peers],
                "seen": int(grant.seen), "away": grant.away}
        with self.db.write() as txn:
            txn.put(customer, cbor2.dumps(body), db=self._grants)

    # --- capabilities ------------------------------------------------------------------

    def usage(self, customer: bytes) -> int:
        """Bytes of capability held for *customer*."""
        with self.db.read() as txn:
            raw = txn.get(customer, db=self._usage)
        return 0 if raw is None else _U64.unpack(raw)[0]

    def replace_caps(self, customer: bytes, after: bytes, upto: bytes,
                     put: list[Capability], quota: int) -> tuple[bool, int]:
        """Replace the customer's capabilities with block ids in (*after*, *upto*] by
        *put* in one transaction, unless that takes it past *quota* bytes: (done, bytes
        held after)."""
        try:
            with self.db.write() as txn:
                used = self._replace(txn, customer, after, upto, put, quota)
        except _OverQuota:
            return False, self.usage(customer)
        return True, used

    def _replace(self, txn, customer: bytes, after: bytes, upto: bytes,
                 put: list[Capability], quota: int) -> int:
        raw = txn.get(customer, db=self._usage)
        used = 0 if raw is None else _U64.unpack(raw)[0]
        cursor = txn.cursor(db=self._caps)
        if cursor.set_range(customer + after):
            while cursor.key() and bytes(cursor.key()[:32]) == customer:
                block = bytes(cursor.key()[32:])
                if block > upto:
                    break
                if block == after:
                    cursor.next()
                    continue
                used -= 64 + len(cursor.value())
                cursor.delete()  # moves to the next key
        for cap in put:
            value = cap.encode()
            used += 64 + len(value)
            txn.put(customer + cap.block, value, db=self._caps)
        if used > quota:
            raise _OverQuota  # rolls the transaction back
        txn.put(customer, _U64.pack(max(0, used)), db=self._usage)
        return max(0, used)

    def caps_after(self, customer: bytes, after: bytes, limit: int) -> list[Capability]:
        """Up to *limit* of the customer's capabilities with block ids above *after*."""
        found: list[Capability] = []
        with self.db.read() as txn:
            cursor = txn.cursor(db=self._caps)
            if not cursor.set_range(customer + after):
                return found
            for key, raw in cursor:
                if bytes(key[:32]) != customer:
                    break
                block = bytes(key[32:])
                if block == after:
                    continue
                found.append(decode_cap(block, raw))
                if len(found) >= limit:
                    break
        return found

    def cap(self, customer: bytes, block: bytes) -> Capability | None:
        """One block's capability, or None."""
        with self.db.read() as txn:
            raw = txn.get(customer + block, db=self._caps)
        return None if raw is None else decode_cap(block, raw)

    def move_holder(self, customer: bytes, cap: Capability, index: int, new: bytes,
                    sign: Callable[[int], bytes]) -> int:
        """Record a re-created shard in one transaction: its new holder in the capability
        and the journal entry ``sign(seq)`` under the customer's next number; return it."""
        holders = list(cap.holders)
        holders[index] = new
        moved = Capability(cap.block, cap.k, cap.n, cap.size, cap.ids, holders)
        with self.db.write() as txn:
            raw = txn.get(b"seq" + customer, db=self._usage)
            seq = (0 if raw is None else _U64.unpack(raw)[0]) + 1
            txn.put(b"seq" + customer, _U64.pack(seq), db=self._usage)
            txn.put(customer + cap.block, moved.encode(), db=self._caps)
            txn.put(customer + _U64.pack(seq), sign(seq), db=self._journal)
        cap.holders = holders
        return seq

    # --- the journal -------------------------------------------------------------------

    def journal_after(self, customer: bytes, after: int, limit: int) -> tuple[list[bytes], bool]:
        """Up to *limit* entries numbered above *after*, and whether more follow."""
        found: list[bytes] = []
        with self.db.read() as txn:
            cursor = txn.cursor(db=self._journal)
            if not cursor.set_range(customer + _U64.pack(after + 1)):
                return found, False
            for key, raw in cursor:
                if bytes(key[:32]) != customer:
                    return found, False
                if len(found) >= limit:
                    return found, True
                found.append(bytes(raw))
        return found, False

    def journal_length(self, customer: bytes) -> int:
        """Entries held for *customer* (blocking; bounded by MAX_JOURNAL)."""
        count = 0
        with self.db.read() as txn:
            cursor = txn.cursor(db=self._journal)
            if cursor.set_range(customer):
                for key in cursor.iternext(keys=True, values=False):
                    if bytes(key[:32]) != customer:
                        break
                    count += 1
        return count

    def acknowledge(self, customer: bytes, upto: int, batch: int) -> tuple[int, bool]:
        """Drop up to *batch* entries numbered up to *upto*: (dropped, more left)."""
        dropped = 0
        with self.db.write() as txn:
            cursor = txn.cursor(db=self._journal)
            if not cursor.set_range(customer):
                return 0, False
            while cursor.key() and bytes(cursor.key()[:32]) == customer:
                if _U64.unpack(cursor.key()[32:])[0] > upto:
                    break
                if dropped >= batch:
                    return dropped, True
                cursor.delete()  # moves to the next entry
                dropped += 1
        return dropped, False
