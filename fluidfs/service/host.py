"""The server half of a peer: answers other peers' RPCs about the shards we host for them.

Rules enforced here (see docs/protocol.md for the wire side, §5 for the limits):

- Agreements (``ProposeAgreement``): offer and ask must each be at least the minimum
  terms; we never host more than ``ratio`` times what the proposer hosts for us, nor
  more than a trust-scaled share of ``donate`` for one peer (a larger ask is
  counter-proposed down to it, at the proposer's ratio); a peer whose trust fell below
  the floor, or whose agreement we ended less than a cool-down ago, is refused; new
  agreements are granted at a bounded rate and up to a bounded count (idle, empty ones
  are evicted first to make room). Renewing never clears a running failure clock.
- A store needs a live agreement; it is refused (``over_quota``) past the promise or
  past ``donate`` (bytes held for others). Quota is checked inside the write
  transaction that stores the shards, so concurrent stores can never overshoot; a
  shard whose bytes do not match its id is refused (``bad_shard``).
- Only the owner of a shard can retrieve, audit or delete it: shards are keyed
  by the proven identity of the connection that stored them. Deletes de-duplicate ids
  and never read a shard.
- Records (``PutRecord``) are kept only for peers with a live agreement, one per kind,
  and go with the agreement.
- Every shard-store and record-store call runs in a worker thread of ``limiter``, the
  peer service's own (so peers cannot starve the filesystem's sealing threads).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import trio

from fluidfs.blocks import merkle
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import REQUEST_SCHEMAS
from fluidfs.peers import rootrecord
from fluidfs.peers.address import AddressError, PeerAddr, UnusableAddress
from fluidfs.peers.agreements import Agreement, Ledger, TermsPolicy
from fluidfs.peers.lifecycle import DAY
from fluidfs.peers.peerlist import ORIGIN_PEER, PeerList
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

log = logging.getLogger(__name__)

SHARE_LIMIT = 64
FAULTY_OPS = {"StoreShard", "RetrieveShard", "AuditShard"}


class PeerService:
    """Dispatcher for inbound RPCs (plugs into fluidfs.net.rpc)."""

    schemas = REQUEST_SCHEMAS

    def __init__(
        self,
        shards: ShardStore,
        ledger: Ledger,
        peers: PeerList,
        *,
        donate: int,
        ratio: float,
        limiter: trio.CapacityLimiter,
        addr_of: Callable[[], str] = lambda: "",
        fault_rate: float = 0.0,
        lie_on_retrieve: bool = False,
        terms: TermsPolicy | None = None,
        cooldown: float = DAY,
    ) -> None:
        self.shards = shards
        self.ledger = ledger
        self.peers = peers
        self.donate = donate
        self.ratio = ratio
        self.limiter = limiter
        self.terms = terms or TermsPolicy()
        self.cooldown = cooldown
        # Token bucket for new agreements (capacity and refill: terms.new_per_hour).
        self._grants = float(self.terms.new_per_hour)
        self._grants_at = time.monotonic()
        self.addr_of = addr_of
        self.fault_rate = fault_rate  # test-only: fail this share of shard requests
        self.lie_on_retrieve = lie_on_retrieve  # test-only: a host that passes audits but lies
        self.on_agreement: Callable[[bytes], None] | None = None
        self.on_end: Callable[[bytes], None] | None = None

    async def handle(self, peer_key: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Serve one validated request."""
        method = getattr(self, "op_" + op, None)
        if method is None:
            raise RpcError("unknown_op", f"{op} is not served here")
        if self.fault_rate and op in FAULTY_OPS and random.random() < self.fault_rate:
            raise RpcError("busy", "injected fault (--fault-rate)")
        return await method(peer_key, args)

    def hosted_total(self) -> int:
        """Bytes held in the shard store for every owner, this node included (blocking)."""
        return sum(used for owner, used in self.shards.owners().items())

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # --- agreements ----------------------------------------------------------------------

    async def op_ProposeAgreement(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        offer, ask, term = args["offer"], args["ask"], args["term"]
        addr = _claimed_addr(args)
        renewal = self.ledger.live(peer) is not None
        granted, reason = self._terms_for(peer, offer, ask)
        if reason is None and not renewal:
            reason = await self._room_for_new(peer)
        if reason is not None:
            log.info("declined an agreement with %s: %s", peer.hex()[:12], reason)
            return {"accepted": False, "offer": offer, "ask": ask, "term": term, "reason": reason}
        if not renewal:
            self._grants -= 1
        if peer not in self.peers:
            self.peers.add(peer, origin=ORIGIN_PEER)  # its address once verified
        self._note_addr(peer, addr)
        offer, ask = granted
        # The proposer's "ask" is what we host; its "offer" is what it hosts for us.
        self.ledger.record(
            peer, we_host=ask, they_host=offer, term=term, store_at=args.get("store_at")
        )
        if self.on_agreement is not None:
            self.on_agreement(peer)
        return {"accepted": True, "offer": offer, "ask": ask, "term": term}

    def _terms_for(self, peer: bytes, offer: int, ask: int) -> tuple[tuple[int, int], str | None]:
        """The (offer, ask) we would grant *peer*, or a reason to refuse."""
        terms = self.terms
        if offer < terms.min_bytes or ask < terms.min_bytes:
            return (0, 0), f"below the minimum terms: offer and ask of {terms.min_bytes} bytes"
        if ask > self.ratio * offer:
            return (0, 0), f"asks {ask} bytes for {offer} offered (ratio limit {self.ratio})"
        if ask > self.donate:
            return (0, 0), f"asks more than this node's whole donation: no space ({self.donate})"
        wait = self.ledger.in_cooldown(peer, self.cooldown)
        if wait:
            return (0, 0), f"we ended our agreement for failures; refused for another {wait:.0f} s"
        known = self.peers.get(peer)
        initial = self.peers.policy.initial or 1.0
        factor = (known.trust if known is not None else initial) / initial
        if factor < terms.min_trust:
            return (0, 0), "trust too low after failures"
        left = self.donate - self.ledger.promised_by_us(excluding=peer)
        granted_ask = min(ask, terms.cap(self.donate, factor), left)
        if granted_ask < terms.min_bytes:
            return (0, 0), "no space left to promise"
        # A counter-proposal keeps the proposer's ratio (rounding in its favour).
        return (offer * granted_ask // ask, granted_ask), None

    async def _room_for_new(self, peer: bytes) -> str | None:
        """Whether a new agreement may be made now (rate and count); evicts to make room."""
        terms = self.terms
        now = time.monotonic()
        refill = (now - self._grants_at) * terms.new_per_hour / 3600.0
        self._grants = min(float(terms.new_per_hour), self._grants + refill)
        self._grants_at = now
        if self._grants < 1:
            return f"too many new agreements (at most {terms.new_per_hour} an hour); try later"
        live = len(self.ledger.active())
        ended = len(self.ledger) - live
        if live < terms.max_agreements and ended < terms.max_ended:
            return None
        held = await self._run(self.shards.owners)
        if ended >= terms.max_ended:
            for key in self.ledger.evictable(held, ended=True)[: ended - terms.max_ended + 1]:
                await self._forget(key, "to remember newer ones")
            if len(self.ledger.ended()) >= terms.max_ended:  # all still hold shards
                return "too many ended agreements still being cleaned up; try later"
        if live >= terms.max_agreements:
            idle = time.time() - terms.idle_grace
            evictable = [k for k in self.ledger.evictable(held, ended=False, idle_since=idle)
                         if k != peer]
            if not evictable:
                return f"this node keeps at most {terms.max_agreements} agreements"
            await self._end_idle(evictable[0])
        if len(self.ledger.active()) >= terms.max_agreements:  # taken while we evicted
            return f"this node keeps at most {terms.max_agreements} agreements"
        return None

    async def _end_idle(self, key: bytes) -> None:
        """End a live agreement that holds nothing either way, to make room.

        The peer is told by the lifecycle (``EndAgreement``) like after any end we decide;
        this is no failure of the peer's, so no cool-down applies.
        """
        log.info("ending the idle agreement with %s to make room for a new peer", key.hex()[:12])
        if self.ledger.mark_ended(key) is not None and self.on_end is not None:
            self.on_end(key)
        if self.records is not None:
            await self._run(self.records.delete, key)

    async def _forget(self, key: bytes, why: str) -> None:
        """Drop an agreement that holds nothing, with any records we keep for it."""
        agreement: Agreement | None = self.ledger.get(key)
        if agreement is None:
            return
        log.info("forgetting the agreement with %s: %s", key.hex()[:12], why)
        self.ledger.end(key)
        if self.records is not None:
            await self._run(self.records.delete, key)

    async def op_EndAgreement(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        agreement = self.ledger.mark_ended(peer, notified=True)
        if agreement is not None:
            log.info("peer %s ended our agreement", peer.hex()[:12])
            if self.on_end is not None:
                self.on_end(peer)
        return {"ended": agreement is not None}

    # --- shards --------------------------------------------------------------------------

    async def op_StoreShard(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        agreement = self.ledger.live(peer)
        if agreement is None:
            raise RpcError("no_agreement", "no storage agreement with you")
        # The quota (this owner's and the donation's) is checked inside the one write
        # transaction that stores the shards: LMDB runs write transactions one at a time,
        # so concurrent stores can never overshoot, and no extra worker-thread trip is
        # needed to read the usage first.
        items = [(item["id"], item["data"]) for item in args["shards"]]
        bad, over = await self._run(self._store, peer, items, agreement.we_host)
        refused = [{"id": sid, "code": "bad_shard"} for sid in bad]
        refused += [{"id": sid, "code": "over_quota"} for sid in over]
        failed = bad | over
        return {"stored": [sid for sid, _ in items if sid not in failed], "refused": refused}

    def _store(
        self, peer: bytes, shards: list[tuple[bytes, bytes]], quota: int
    ) -> tuple[set[bytes], set[bytes]]:
        """Check and write shards (worker thread); return (bad ids, over-quota ids)."""
        good = [(sid, data) for sid, data in shards if merkle.shard_id(data) == sid]
        bad = {sid for sid, _ in shards} - {sid for sid, _ in good}
        over = self.shards.put_within(
            peer, good, quota=quota, pool=self.donate, outside_pool=self.peers.self_key
        )
        return bad, set(over)

    async def op_RetrieveShard(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        data = await trio.to_thread.run_sync(
            self.shards.get, peer, args["id"], limiter=self.limiter
        )
        if data is None:
            raise RpcError("not_found", "no such shard of yours here")
        if self.lie_on_retrieve and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return {"data": data}

    async def op_DeleteShard(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        deleted, _freed = await self._run(self.shards.delete_counted, peer, args["ids"])
        return {"deleted": deleted}

    async def op_AuditShard(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        data = await trio.to_thread.run_sync(
            self.shards.get, peer, args["id"], limiter=self.limiter
        )
        if data is None:
            raise RpcError("not_found", "no such shard of yours here")
        index = args["leaf"]
        if index >= merkle.leaf_count(len(data)):
            raise RpcError("bad_request", "leaf index out of range")
        path = await trio.to_thread.run_sync(merkle.proof, data, index, limiter=self.limiter)
        return {"leaf_data": merkle.leaf(data, index), "path": path}

    # --- discovery and liveness -------------------------------------------------------------

    async def op_ShareNewPeers(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        # Verified rows only, trusted and long-known first (never the newest strangers).
        limit = min(args["max"], SHARE_LIMIT)
        self.peers.seen(peer)
        shared = self.peers.referrals(limit, exclude=peer)
        return {"peers": [{"id": p.key, "addr": p.addr} for p in shared]}

    async def op_Ping(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        self._note_addr(peer, _claimed_addr(args))
        return {"time": int(time.time())}

    def _note_addr(self, peer: bytes, addr: PeerAddr | None) -> None:
        """The connection proved *peer*; where it listens is a claim for discovery to check."""
        if addr is None:
            self.peers.seen(peer)
        else:
            self.peers.claim(peer, addr, source=peer)

    # --- owners' records (root pointer, writer lease) -------------------------------------

    records: RecordStore | None = None  # set by the node; None: records are not kept here

    async def op_PutRecord(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        if self.records is None:
            raise RpcError("refused", "this peer keeps no records")
        if self.ledger.live(peer) is None:
            raise RpcError("no_agreement", "no live storage agreement with you")
        try:
            record = rootrecord.parse(args["record"])
        except rootrecord.RecordError as exc:
            raise RpcError("bad_request", str(exc)) from None
        if record.owner != peer:
            raise RpcError("bad_request", "a record can only be stored by its owner")
        if not record.signed_ok():
            raise RpcError("bad_request", "record signature does not verify")
        raw = await trio.to_thread.run_sync(
            self.records.get, peer, record.kind, limiter=self.limiter
        )
        if raw is not None:
            try:
                held = rootrecord.parse(raw).seq
            except rootrecord.RecordError:
                held = -1  # unreadable: replace it
            if held > record.seq or (held == record.seq and raw != record.raw):
                return {"stored": False, "seq": held}
        await trio.to_thread.run_sync(
            self.records.put, peer, record.kind, record.raw, limiter=self.limiter
        )
        return {"stored": True, "seq": record.seq}

    async def op_GetRecord(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        if self.records is None or args["kind"] not in rootrecord.KINDS:
            raise RpcError("not_found", "no such record here")
        raw = await trio.to_thread.run_sync(
            self.records.get, peer, args["kind"], limiter=self.limiter
        )
        if raw is None:
            raise RpcError("not_found", "no such record of yours here")
        return {"record": raw}


def _claimed_addr(args: dict[str, Any]) -> PeerAddr | None:
    """The ``addr`` a caller says it listens at: None if absent or undialable (a wildcard
    such as ``0.0.0.0:7470`` is a hint we cannot use, not an error); ``bad_request`` if
    malformed."""
    text = args.get("addr", "")
    if not text:
        return None
    try:
        return PeerAddr.parse(text)
    except UnusableAddress:
        return None
    except AddressError as exc:
        raise RpcError("bad_request", f"addr: {exc}") from None
