"""The server half of a peer: answers other peers' RPCs about the shards we host for them.

Rules enforced here (see docs/protocol.md for the wire side):

- An agreement is accepted only if what we would host fits in ``donate`` next to
  every other promise, and we would not host more than ``ratio`` times what the
  proposer hosts for us.
- A store needs an agreement; it is refused (``over_quota``) past the promise or
  past ``donate``; a shard whose bytes do not match its id is refused
  (``bad_shard``). Stores are written in one batched LMDB transaction.
- Only the owner of a shard can retrieve, audit or delete it: shards are keyed
  by the proven identity of the connection that stored them.
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
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.peerlist import PeerList
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
    ) -> None:
        self.shards = shards
        self.ledger = ledger
        self.peers = peers
        self.donate = donate
        self.ratio = ratio
        self.limiter = limiter
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
        """Bytes we hold for all peers together."""
        return sum(used for owner, used in self.shards.owners().items())

    # --- agreements ----------------------------------------------------------------------

    async def op_ProposeAgreement(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        offer, ask, term = args["offer"], args["ask"], args["term"]
        addr = args.get("addr", "")
        reason = None
        if ask > self.ratio * offer:
            reason = f"asks {ask} bytes for {offer} offered (ratio limit {self.ratio})"
        elif self.ledger.promised_by_us(excluding=peer) + ask > self.donate:
            reason = "no space left to promise"
        if reason is not None:
            return {"accepted": False, "offer": offer, "ask": ask, "term": term, "reason": reason}
        if peer not in self.peers:
            self.peers.add(peer, addr)
        else:
            self.peers.seen(peer, addr)
        # The proposer's "ask" is what we host; its "offer" is what it hosts for us.
        self.ledger.record(
            peer, we_host=ask, they_host=offer, term=term, store_at=args.get("store_at")
        )
        if self.on_agreement is not None:
            self.on_agreement(peer)
        return {"accepted": True, "offer": offer, "ask": ask, "term": term}

    async def op_EndAgreement(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        agreement = self.ledger.mark_ended(peer, notified=True)
        if agreement is not None:
            log.info("peer %s ended our agreement", peer.hex()[:12])
            if self.on_end is not None:
                self.on_end(peer)
        return {"ended": agreement is not None}

    # --- shards --------------------------------------------------------------------------

    async def op_StoreShard(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        agreement = self.ledger.get(peer)
        if agreement is None or not agreement.active:
            raise RpcError("no_agreement", "no storage agreement with you")
        used = self.shards.used(peer)
        total = self.hosted_total()
        accepted: list[tuple[bytes, bytes]] = []
        refused: list[dict[str, Any]] = []
        for item in args["shards"]:
            size = len(item["data"])
            if used + size > agreement.we_host or total + size > self.donate:
                refused.append({"id": item["id"], "code": "over_quota"})
                continue
            accepted.append((item["id"], item["data"]))
            used += size
            total += size
        if accepted:
            bad = await trio.to_thread.run_sync(self._store, peer, accepted, limiter=self.limiter)
            refused += [{"id": sid, "code": "bad_shard"} for sid in bad]
        stored = [sid for sid, _ in accepted if sid not in {r["id"] for r in refused}]
        return {"stored": stored, "refused": refused}

    def _store(self, peer: bytes, shards: list[tuple[bytes, bytes]]) -> list[bytes]:
        good = [(sid, data) for sid, data in shards if merkle.shard_id(data) == sid]
        self.shards.put_many(peer, good)
        return [sid for sid, data in shards if (sid, data) not in good]

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
        ids = args["ids"]
        held = await trio.to_thread.run_sync(self.shards.get_many, peer, ids, limiter=self.limiter)
        present = [sid for sid, data in zip(ids, held, strict=True) if data is not None]
        await trio.to_thread.run_sync(self.shards.delete_many, peer, present, limiter=self.limiter)
        return {"deleted": len(present)}

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
        limit = min(args["max"], SHARE_LIMIT)
        known = [p for p in self.peers if p.key != peer and p.addr]
        known.sort(key=lambda p: -p.last_seen)
        return {"peers": [{"id": p.key, "addr": p.addr} for p in known[:limit]]}

    async def op_Ping(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        addr = args.get("addr", "")
        if addr:
            if peer in self.peers:
                self.peers.seen(peer, addr)
            else:
                self.peers.add(peer, addr)
        return {"time": int(time.time())}

    # --- owners' records (root pointer, writer lease) -------------------------------------

    records: RecordStore | None = None  # set by the node; None: records are not kept here

    async def op_PutRecord(self, peer: bytes, args: dict[str, Any]) -> dict[str, Any]:
        if self.records is None:
            raise RpcError("refused", "this peer keeps no records")
        if self.ledger.get(peer) is None:
            raise RpcError("no_agreement", "no storage agreement with you")
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
