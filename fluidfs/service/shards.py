"""Shard RPCs: partners store, retrieve, audit and delete the shards we host for them.

- A store needs a live agreement; what does not fit the promise or the donation is
  refused (``over_quota``), a shard whose bytes do not match its id too (``bad_shard``);
  see service/quota.py for how concurrent stores are kept within the quota.
- ``ListShards`` pages through the ids of the caller's shards (any agreement, live or
  ended, remembered: an owner reconciles what we hold; see blocks/reconcile.py).
- ``RetrieveShards`` answers several of the caller's small shards in one read
  transaction and one worker-thread hop (metadata nodes on a fresh machine: the cost of
  a shard request is the request, not the bytes); it needs an agreement (live or ended)
  and answers at most MAX_BATCH_BYTES, each shard at most MAX_BATCH_SHARD.
- Only the owner of a shard can retrieve, audit or delete it: shards are keyed by the
  proven identity of the connection that stored them. Deletes de-duplicate ids and never
  read a shard.
- Every shard-store call (and every Merkle proof) runs in a worker thread of the service's
  own limiter, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from fluidfs.blocks import merkle
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_BATCH_BYTES, MAX_BATCH_SHARD
from fluidfs.peers.agreements import Ledger
from fluidfs.service.faults import FaultInjection
from fluidfs.service.ops import Args, Op, Reply
from fluidfs.service.quota import ShardQuota
from fluidfs.store.shards import ShardStore


@dataclass
class ShardOps:
    """Answers StoreShard, RetrieveShard(s), DeleteShard, AuditShard and ListShards."""

    shards: ShardStore
    ledger: Ledger
    quota: ShardQuota
    limiter: trio.CapacityLimiter
    faults: FaultInjection

    def ops(self) -> dict[str, Op]:
        """The ops served here, by wire name."""
        return {
            "StoreShard": self.store,
            "RetrieveShard": self.retrieve,
            "RetrieveShards": self.retrieve_many,
            "DeleteShard": self.delete,
            "AuditShard": self.audit,
            "ListShards": self.list_ids,
        }

    async def store(self, peer: bytes, args: Args) -> Reply:
        """Store what fits of the batch; report each shard stored or refused."""
        if self.ledger.live(peer) is None:  # strangers never reach the quota's lock table
            raise RpcError("no_agreement", "no storage agreement with you")
        items = [(item["id"], item["data"]) for item in args["shards"]]
        bad, over = await self.quota.store(peer, items, self._promised)
        refused = [{"id": sid, "code": "bad_shard"} for sid in bad]
        refused += [{"id": sid, "code": "over_quota"} for sid in over]
        failed = bad | over
        return {"stored": [sid for sid, _ in items if sid not in failed], "refused": refused}

    async def retrieve(self, peer: bytes, args: Args) -> Reply:
        """The bytes of one of the caller's shards."""
        data = await self._get(peer, args["id"])
        return {"data": self.faults.served(data)}

    async def retrieve_many(self, peer: bytes, args: Args) -> Reply:
        """Several of the caller's small shards: each id once, within the answer's bounds;
        an id held but left out (too large, or the answer full) is in neither list."""
        if self.ledger.get(peer) is None:  # strangers never reach the shard store
            raise RpcError("no_agreement", "no storage agreement with you")
        found, missing = await trio.to_thread.run_sync(
            self.shards.get_many, peer, args["ids"], MAX_BATCH_SHARD, MAX_BATCH_BYTES,
            limiter=self.limiter,
        )
        agreement = self.ledger.live(peer)
        if found and agreement is not None and agreement.unclaimed_since is not None:
            # The owner uses shards kept from an ended agreement: they are claimed again.
            await trio.to_thread.run_sync(
                self.shards.claim_many, peer, [sid for sid, _ in found], limiter=self.limiter
            )
        return {"found": [{"id": sid, "data": self.faults.served(data)} for sid, data in found],
                "missing": missing}

    async def delete(self, peer: bytes, args: Args) -> Reply:
        """Delete some of the caller's shards (each id counted once)."""
        deleted, _freed = await trio.to_thread.run_sync(
            self.shards.delete_counted, peer, args["ids"], limiter=self.limiter
        )
        return {"deleted": deleted}

    async def audit(self, peer: bytes, args: Args) -> Reply:
        """One Merkle leaf of one of the caller's shards, with its proof."""
        data = await self._get(peer, args["id"])
        index = args["leaf"]
        if index >= merkle.leaf_count(len(data)):
            raise RpcError("bad_request", "leaf index out of range")
        path = await trio.to_thread.run_sync(merkle.proof, data, index, limiter=self.limiter)
        return {"leaf_data": merkle.leaf(data, index), "path": path}

    async def list_ids(self, peer: bytes, args: Args) -> Reply:
        """One page of the ids of the caller's shards held here, in order, after
        ``after``: at most ``limit`` (itself at most MAX_LIST_PAGE, by the schema)."""
        if self.ledger.get(peer) is None:
            raise RpcError("no_agreement", "no storage agreement with you")
        ids, more = await trio.to_thread.run_sync(
            self.shards.ids_after, peer, args["after"], args["limit"], limiter=self.limiter
        )
        return {"ids": ids, "more": more}

    def _promised(self, owner: bytes) -> int:
        """Bytes we promised to host for *owner* (0 once its agreement ended)."""
        agreement = self.ledger.live(owner)
        return agreement.we_host if agreement is not None else 0

    async def _get(self, peer: bytes, shard_id: bytes) -> bytes:
        data = await trio.to_thread.run_sync(
            self.shards.get, peer, shard_id, limiter=self.limiter
        )
        if data is None:
            raise RpcError("not_found", "no such shard of yours here")
        agreement = self.ledger.live(peer)
        if agreement is not None and agreement.unclaimed_since is not None:
            # The owner uses a shard kept from an ended agreement: it is claimed again.
            await trio.to_thread.run_sync(
                self.shards.claim, peer, shard_id, limiter=self.limiter
            )
        return data
