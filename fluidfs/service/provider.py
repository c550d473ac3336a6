"""The storage provider's side (docs/federation.md): reservations and the shards under them.

Who may call what:

- ``Reserve`` / ``Unreserve``: only a customer the operator admitted (``fluidfs provider
  add``); anyone else is ``refused``. A reservation names the customer's partner and a
  size; all of a customer's live reservations together stay within its quota
  (``over_quota``), at most ``MAX_RESERVATIONS`` per customer, never below what the
  reservation already holds. A reservation is a promise of disk: a new one, or the
  growth of one, must also fit in the room the state disk has for peers (free space less
  ``PEER_RESERVE``) beyond what every live reservation has promised and not yet filled
  (``over_quota``), so quotas the operator granted beyond the disk are not promised.
- ``Account``: only a customer; its own quota, reservations and bytes reserved and held.
- ``RedeemInvite``: anyone; the secret of a one-time invitation code the operator made
  (``fluidfs provider invite``) admits the caller with the code's quota and is used up
  (``refused`` if unknown, used or expired: the code is 128 random bits, so guessing is
  hopeless and costs the guesser a round trip and us a read).
- ``StoreShard`` / ``RetrieveShard`` / ``DeleteShard`` / ``AuditShard`` carrying
  ``for: CUSTOMER``: the caller is the customer's partner. A store needs a live
  reservation for (customer, caller) and fits within its size (``no_agreement`` /
  ``over_quota``); retrieve, audit and delete are answered while the reservation exists,
  live or removed and within its keep period, whether or not the customer is online.
  Without ``for`` the ops are the node's ordinary ones (service/shards.py).
- ``PutRecord`` / ``GetRecord`` carrying ``for: CUSTOMER``: the partner's own root pointer
  and writer lease, kept for it as the customer would keep them (service/records.py's
  rules): a put needs a live reservation for (customer, caller); a get is answered while
  the reservation exists, live or in its keep period. At most one record of each kind
  per reservation (64 KiB each), dropped with the reservation; not counted against its
  size, as a host does not count them against an agreement.
- ``ListReserved`` / ``FetchReserved`` / ``StoreReserved``: only the customer, on its own
  reservations: list and fetch what one holds (live or in its keep period), store into a
  live one within its size. The customer uses them to hand its side over when it switches
  providers (peers/handover.py); nobody else reaches shards under a reservation this way.
- ``FetchReservedRecord`` / ``StoreReservedRecord``: only the customer, likewise for the
  partner's records under a reservation: fetch one (live or in its keep period), store
  one into a live reservation if it is the partner's own, validly signed and not older
  than the one held (peers/recordmove.py), so the records move with the side.

Shards under a reservation live in the shard store under the reservation's own owner key
(store/accounts.py ``holder_key``), counted against the reservation's size and, with
everything else the node holds, against its donation. Records under a reservation live
in a record store of their own (``<state>/reserved-records``), under the same key.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from fluidfs.diskspace import PEER_RESERVE
from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.recordmove import adopt
from fluidfs.peers.rootrecord import RecordError
from fluidfs.service.ops import Args, Op, Reply
from fluidfs.service.quota import ShardQuota
from fluidfs.service.records import RecordOps, keep_record, over_quota_if_full, read_record
from fluidfs.service.shards import ShardOps
from fluidfs.store.accounts import (
    MAX_RESERVATIONS,
    Account,
    AccountBook,
    InvitationRefused,
    Reservation,
)
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

log = logging.getLogger(__name__)

DROP_BATCH = 1024  # shards deleted per write transaction when a removed reservation expires
SHARD_OPS = ("StoreShard", "RetrieveShard", "DeleteShard", "AuditShard")


@dataclass
class ProviderOps:
    """Answers Reserve and Unreserve, and shard ops sent ``for`` a customer."""

    book: AccountBook
    shards: ShardStore
    quota: ShardQuota
    direct: ShardOps  # the node's own shard ops, for requests without "for"
    limiter: trio.CapacityLimiter
    self_key: bytes
    keep: float  # seconds a removed reservation's shards are still served
    direct_records: RecordOps  # the node's own record ops, for requests without "for"
    records: RecordStore | None  # partners' records under reservations (None: kept nowhere)
    _storing: set[bytes] = field(default_factory=set, init=False)  # with a reservation
    _reserving: trio.Lock = field(default_factory=trio.Lock, init=False)  # one at a time

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self, reservations: list[Reservation] | None = None) -> None:
        """Re-read which peers store under a reservation, live or in its keep period (the
        operator may have closed an account from another process)."""
        found = self.book.reservations() if reservations is None else reservations
        self._storing = {r.peer for r in found}

    def ops(self) -> dict[str, Op]:
        """The ops served here, by wire name (the shard ops wrap the direct ones)."""
        return {
            "Reserve": self.reserve,
            "Unreserve": self.unreserve,
            "RedeemInvite": self.redeem_invite,
            "Account": self.account,
            "StoreShard": self.store,
            "RetrieveShard": self.retrieve,
            "DeleteShard": self.delete,
            "AuditShard": self.audit,
            "PutRecord": self.put_record,
            "GetRecord": self.get_record,
            "ListReserved": self.list_reserved,
            "FetchReserved": self.fetch_reserved,
            "StoreReserved": self.store_reserved,
            "FetchReservedRecord": self.fetch_reserved_record,
            "StoreReservedRecord": self.store_reserved_record,
        }

    def is_partner(self, key: bytes) -> bool:
        """True for a customer, or a peer with shards under one of its reservations: they
        get a partner's room at admission (net/admission.py)."""
        return key in self._storing or self.book.account(key) is not None

    # --- the customer -------------------------------------------------------------------

    async def reserve(self, customer: bytes, args: Args) -> Reply:
        """Make or resize the reservation for the customer's partner ``peer``."""
        account = self._customer(customer)
        peer, size = args["peer"], args["size"]
        if peer in (customer, self.self_key):
            raise RpcError("bad_request", "a reservation is for one of your other partners")
        if size == 0:
            raise RpcError("bad_request", "a reservation needs a size")
        # One at a time: two reservations checked against the same disk room would
        # together promise it twice.
        async with self._reserving:
            return await self._reserve(customer, account, peer, size)

    async def _reserve(self, customer: bytes, account: Account, peer: bytes,
                       size: int) -> Reply:
        old = self.book.reservation(customer, peer)
        if old is None and len(self.book.reservations(customer)) >= MAX_RESERVATIONS:
            raise RpcError("refused", f"at most {MAX_RESERVATIONS} reservations per customer")
        if self.book.reserved(customer, excluding=peer) + size > account.quota:
            raise RpcError("over_quota", f"your quota is {account.quota} bytes")
        if old is not None:
            held = await trio.to_thread.run_sync(self.shards.used, old.holder,
                                                 limiter=self.limiter)
            if size < held:
                raise RpcError("refused", f"the reservation already holds {held} bytes")
        grows = size - (old.size if old is not None and old.live else 0)
        if grows > 0:
            room = await trio.to_thread.run_sync(self._room_to_promise, limiter=self.limiter)
            if grows > room:
                raise RpcError("over_quota", f"this provider's disk has room for {max(0, room)}"
                                             " more bytes")
        self.book.reserve(customer, peer, size)
        self._storing.add(peer)
        log.info("customer %s reserved %d bytes for %s", _short(customer), size, _short(peer))
        return {"size": size}

    def _room_to_promise(self) -> int:
        """Bytes the state disk has for peers (``PEER_RESERVE`` left free) that no live
        reservation has promised yet: its room less what every live reservation may
        still fill. Blocking (a statvfs and two LMDB reads): a worker thread."""
        disk = self.quota.reserve.room_for(self.shards.data_file) - PEER_RESERVE
        held = self.shards.owners()
        unfilled = sum(max(0, r.size - held.get(r.holder, 0))
                       for r in self.book.reservations() if r.live)
        return disk - unfilled

    async def unreserve(self, customer: bytes, args: Args) -> Reply:
        """Remove the reservation for ``peer``; its shards stay for the keep period."""
        self._customer(customer)
        removed = self.book.unreserve(customer, args["peer"])
        if removed:
            log.info("customer %s removed its reservation for %s",
                     _short(customer), _short(args["peer"]))
        return {"removed": removed}

    async def account(self, customer: bytes, _args: Args) -> Reply:
        """The customer's quota, live reservations and bytes reserved and held."""
        row = await trio.to_thread.run_sync(self._row, self._customer(customer),
                                            limiter=self.limiter)
        return {"quota": row["quota"], "reservations": row["reservations"],
                "reserved": row["reserved_bytes"], "held": row["held_bytes"]}

    async def redeem_invite(self, caller: bytes, args: Args) -> Reply:
        """Admit *caller* with the quota of the invitation whose secret it presents."""
        if caller == self.self_key:
            raise RpcError("bad_request", "a provider is not its own customer")
        try:
            account = self.book.redeem(args["secret"], caller)
        except InvitationRefused as exc:
            raise RpcError("refused", str(exc)) from None
        log.info("%s redeemed an invitation: a customer with %d bytes", _short(caller),
                 account.quota)
        return {"quota": account.quota}

    async def list_reserved(self, customer: bytes, args: Args) -> Reply:
        """One page of the ids held under the customer's reservation for ``peer``."""
        self._customer(customer)
        holder = self._reservation(customer, args["peer"], live=False).holder
        ids, more = await trio.to_thread.run_sync(
            self.shards.ids_after, holder, args["after"], args["limit"], limiter=self.limiter)
        return {"ids": ids, "more": more}

    async def fetch_reserved(self, customer: bytes, args: Args) -> Reply:
        """One shard held under the customer's reservation for ``peer``."""
        self._customer(customer)
        holder = self._reservation(customer, args["peer"], live=False).holder
        return await self.direct.retrieve(holder, {"id": args["id"]})

    async def store_reserved(self, customer: bytes, args: Args) -> Reply:
        """Shards the customer hands over into its live reservation for ``peer`` (from its
        previous provider), checked and counted as the partner's own stores are."""
        self._customer(customer)
        return await self._store_under(customer, args["peer"], args["shards"])

    async def fetch_reserved_record(self, customer: bytes, args: Args) -> Reply:
        """The record of a kind kept under the customer's reservation for ``peer``."""
        self._customer(customer)
        holder = self._reservation(customer, args["peer"], live=False).holder
        if self.records is None:
            raise RpcError("not_found", "no such record here")
        return await read_record(self.records, holder, args["kind"], self.limiter)

    async def store_reserved_record(self, customer: bytes, args: Args) -> Reply:
        """A record of ``peer`` the customer hands over into its live reservation for it
        (from where its side was before): kept only if it is ``peer``'s own, validly
        signed, and not older than the one held (peers/recordmove.py)."""
        self._customer(customer)
        peer = args["peer"]
        holder = self._reservation(customer, peer, live=True).holder
        if self.records is None:
            raise RpcError("refused", "this provider keeps no records")
        try:
            with over_quota_if_full():
                stored, held = await trio.to_thread.run_sync(
                    adopt, self.records, holder, peer, args["record"], limiter=self.limiter)
        except RecordError as exc:
            raise RpcError("bad_request", str(exc)) from None
        return {"stored": stored, "seq": max(held, 0)}

    def _customer(self, key: bytes):
        account = self.book.account(key)
        if account is None:
            raise RpcError("refused", "not a customer of this provider")
        return account

    # --- the customer's partners ----------------------------------------------------------

    async def store(self, peer: bytes, args: Args) -> Reply:
        """Store a batch under the reservation the customer made for the caller."""
        if "for" not in args:
            return await self.direct.store(peer, args)
        return await self._store_under(args["for"], peer, args["shards"])

    async def _store_under(self, customer: bytes, peer: bytes, shards: list) -> Reply:
        """Store a batch under *customer*'s live reservation for *peer*, within its size."""
        reservation = self._reservation(customer, peer, live=True)
        items = [(item["id"], item["data"]) for item in shards]

        def size_of(_owner: bytes) -> int:  # read again under the lock: it may be removed
            now = self.book.reservation(customer, peer)
            return now.size if now is not None and now.live else 0

        bad, over = await self.quota.store(reservation.holder, items, size_of)
        refused = [{"id": sid, "code": "bad_shard"} for sid in bad]
        refused += [{"id": sid, "code": "over_quota"} for sid in over]
        failed = bad | over
        return {"stored": [sid for sid, _ in items if sid not in failed], "refused": refused}

    async def retrieve(self, peer: bytes, args: Args) -> Reply:
        """A shard stored under a reservation (or the caller's own, without ``for``)."""
        if "for" not in args:
            return await self.direct.retrieve(peer, args)
        holder = self._reservation(args["for"], peer, live=False).holder
        return await self.direct.retrieve(holder, {"id": args["id"]})

    async def delete(self, peer: bytes, args: Args) -> Reply:
        """Delete shards stored under a reservation."""
        if "for" not in args:
            return await self.direct.delete(peer, args)
        holder = self._reservation(args["for"], peer, live=False).holder
        return await self.direct.delete(holder, {"ids": args["ids"]})

    async def audit(self, peer: bytes, args: Args) -> Reply:
        """Prove a shard stored under a reservation."""
        if "for" not in args:
            return await self.direct.audit(peer, args)
        holder = self._reservation(args["for"], peer, live=False).holder
        body = {k: v for k, v in args.items() if k != "for"}
        return await self.direct.audit(holder, body)

    async def put_record(self, peer: bytes, args: Args) -> Reply:
        """Keep the caller's record under the customer's live reservation for it."""
        if "for" not in args:
            return await self.direct_records.put(peer, args)
        holder = self._reservation(args["for"], peer, live=True).holder
        if self.records is None:
            raise RpcError("refused", "this provider keeps no records")
        return await keep_record(self.records, holder, peer, args, self.limiter)

    async def get_record(self, peer: bytes, args: Args) -> Reply:
        """The caller's record kept under a reservation (live or in its keep period)."""
        if "for" not in args:
            return await self.direct_records.get(peer, args)
        holder = self._reservation(args["for"], peer, live=False).holder
        if self.records is None:
            raise RpcError("not_found", "no such record here")
        return await read_record(self.records, holder, args["kind"], self.limiter)

    def _reservation(self, customer: bytes, peer: bytes, *, live: bool) -> Reservation:
        reservation = self.book.reservation(customer, peer)
        if reservation is None or (live and not reservation.live):
            raise RpcError("no_agreement", "no reservation for you from that customer here")
        return reservation

    # --- what the operator is shown -----------------------------------------------------

    def figures(self) -> dict[str, int]:
        """Customers, live reservations and bytes reserved and held (blocking: LMDB)."""
        reservations = self.book.reservations()
        live = [r for r in reservations if r.live]
        return {
            "customers": len(self.book.accounts()),
            "reservations": len(live),
            "reserved_bytes": sum(r.size for r in live),
            "held_bytes": sum(self.shards.used(r.holder) for r in reservations),
        }

    def customers(self) -> list[dict[str, Any]]:
        """Per customer: its quota, live reservations and bytes reserved and held
        (blocking: LMDB; grows with the reservations)."""
        return [self._row(account) for account in self.book.accounts()]

    def _row(self, account: Account) -> dict[str, Any]:
        """One customer's figures (blocking: LMDB)."""
        reservations = self.book.reservations(account.customer)
        live = [r for r in reservations if r.live]
        return {
            "id": encode_peer_id(account.customer),
            "quota": account.quota,
            "reservations": len(live),
            "reserved_bytes": sum(r.size for r in live),
            "held_bytes": sum(self.shards.used(r.holder) for r in reservations),
        }

    def with_peers(
        self, peers: Callable[[dict], Awaitable[dict]]
    ) -> Callable[[dict], Awaitable[dict]]:
        """The node's ``peers`` control handler, with its customers added (a list of
        their own, and on each customer's peer row)."""

        async def handler(request: dict) -> dict:
            reply = await peers(request)
            customers = await trio.to_thread.run_sync(self.customers, limiter=self.limiter)
            reply["customers"] = customers
            by_id = {c["id"]: c for c in customers}
            for row in reply["peers"]:
                row["customer"] = by_id.get(row["id"])
            return reply

        return handler

    def with_status(
        self, status: Callable[[dict], Awaitable[dict]]
    ) -> Callable[[dict], Awaitable[dict]]:
        """The node's ``status`` control handler, with the provider's figures added."""

        async def handler(request: dict) -> dict:
            reply = await status(request)
            reply["serving_as_provider"] = await trio.to_thread.run_sync(
                self.figures, limiter=self.limiter)
            return reply

        return handler

    # --- the keep period ------------------------------------------------------------------

    async def run(self, tick: float = 60.0) -> None:
        """Drop removed reservations past the keep period, every *tick*, until cancelled."""
        while True:
            await trio.sleep(tick)
            await self.expire()

    async def expire(self) -> int:
        """Drop the shards and entries of reservations removed more than ``keep`` ago."""
        now = self.book.clock()
        dropped = 0
        # Every customer's reservations: read off the loop (they grow with the customers).
        every = await trio.to_thread.run_sync(self.book.reservations, limiter=self.limiter)
        self.refresh(every)
        for reservation in every:
            if reservation.live or now - reservation.removed <= self.keep:
                continue
            holder = reservation.holder
            ids = await trio.to_thread.run_sync(lambda h=holder: list(self.shards.ids(h)),
                                                limiter=self.limiter)
            for start in range(0, len(ids), DROP_BATCH):
                await trio.to_thread.run_sync(self.shards.delete_many, holder,
                                              ids[start : start + DROP_BATCH],
                                              limiter=self.limiter)
            if self.records is not None:
                await trio.to_thread.run_sync(self.records.delete, holder,
                                              limiter=self.limiter)
            self.book.forget(reservation)
            dropped += 1
            log.info("dropped %d shards of %s's removed reservation for %s", len(ids),
                     _short(reservation.customer), _short(reservation.peer))
        if dropped:  # ... so read again which peers still hold shards here
            self.refresh(await trio.to_thread.run_sync(self.book.reservations,
                                                       limiter=self.limiter))
        return dropped


def _short(key: bytes) -> str:
    return encode_peer_id(key)[:12]
