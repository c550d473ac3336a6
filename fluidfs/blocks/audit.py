"""Verification in the background: is each peer still keeping our shards?

Every cycle, each peer that holds shards of ours is challenged on a few shards
picked at random (reservoir sampling over the block records). A challenge names
a random 64 KiB leaf of the shard; the peer answers with that leaf and its Merkle
path, which we check against the shard id we hold — no whole-shard download
and nothing the peer can precompute, since the leaf is chosen fresh each time.

- Pass: the peer's trust rises and the agreement renews.
- The shard is missing or the proof is wrong: trust falls, the shard is counted
  lost (so repair re-creates it elsewhere), and every other shard that peer
  holds for us is challenged at once — a peer that dropped one shard has often
  dropped more.
- No answer: trust falls and the agreement's failure clock runs; the shard is not
  moved (short outages cost nothing) until the lifecycle ends the agreement.

Traffic: ``samples`` x (64 KiB + ~300 B) per peer per cycle.
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass

import trio

from fluidfs.blocks import merkle
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.net.errors import RpcError
from fluidfs.peers.connections import PeerUnavailable

log = logging.getLogger(__name__)

OK, LOST, UNREACHABLE = "ok", "lost", "unreachable"


@dataclass
class AuditPolicy:
    """How often and how much to verify."""

    interval: float = 3600.0
    samples: int = 2  # shards challenged per peer per cycle
    timeout: float = 20.0


class Auditor:
    """Challenges holders of our shards and acts on the answers."""

    def __init__(self, blocks, remote, policy: AuditPolicy) -> None:
        self.blocks = blocks
        self.remote = remote
        self.policy = policy
        self.cycles = 0
        self.challenges = 0
        self.audit_bytes = 0

    async def run(self) -> None:
        """Audit every interval until cancelled."""
        while True:
            await trio.sleep(self.policy.interval)
            if self.blocks.remote is not None:
                await self.cycle()

    def _holdings(self, sample: int | None) -> dict[int, list[tuple[bytes, int]]]:
        """(block id, shard index) per remote holder: a random sample, or all of them."""
        chosen: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
        seen: dict[int, int] = defaultdict(int)
        with self.blocks.meta.read() as txn:
            for key, raw in txn.cursor(db=self.blocks.meta["blocks"]):
                stored = StoredBlock.decode(bytes(key), raw)
                for index, holder in enumerate(stored.holders):
                    if holder in (NO_HOLDER, LOCAL_HOLDER):
                        continue
                    seen[holder] += 1
                    item = (bytes(key), index)
                    if sample is None or len(chosen[holder]) < sample:
                        chosen[holder].append(item)
                    else:
                        slot = random.randrange(seen[holder])
                        if slot < sample:
                            chosen[holder][slot] = item
        return chosen

    async def cycle(self) -> dict[str, int]:
        """One round of challenges over every holder; returns counts per outcome."""
        outcome: dict[str, int] = defaultdict(int)
        holdings = await trio.to_thread.run_sync(self._holdings, self.policy.samples)

        async def audit_holder(holder: int, items: list[tuple[bytes, int]]) -> None:
            for block_id, index in items:
                result = await self.challenge(holder, block_id, index)
                outcome[result] += 1
                if result == UNREACHABLE:
                    return
                if result == LOST:
                    await self._audit_everything_on(holder, outcome)
                    return

        async with trio.open_nursery() as nursery:
            for holder, items in holdings.items():
                nursery.start_soon(audit_holder, holder, items)
        self.cycles += 1
        return dict(outcome)

    async def _audit_everything_on(self, holder: int, outcome: dict[str, int]) -> None:
        everything = await trio.to_thread.run_sync(self._holdings, None)
        for block_id, index in everything.get(holder, []):
            result = await self.challenge(holder, block_id, index)
            outcome[result] += 1
            if result == UNREACHABLE:
                return

    async def challenge(self, holder: int, block_id: bytes, index: int) -> str:
        """Challenge one shard on its holder; record the outcome everywhere it matters."""
        stored = self.blocks.load(block_id)
        key = self.remote.peers.key_of(holder)
        if stored is None or key is None or stored.holders[index] != holder:
            return OK  # changed meanwhile
        record = stored.record
        leaf = random.randrange(merkle.leaf_count(record.shard_size))
        self.challenges += 1
        try:
            reply = await self.remote.conns.call(
                key,
                "AuditShard",
                {"id": record.shard_ids[index], "leaf": leaf, "nonce": os.urandom(32)},
                timeout=self.policy.timeout,
            )
        except PeerUnavailable:
            self._failed(key)
            return UNREACHABLE
        except RpcError as exc:
            if exc.code == "busy":
                self._failed(key)
                return UNREACHABLE
            return self._lost(key, holder, stored, index, f"answered {exc.code}")
        self.audit_bytes += len(reply["leaf_data"]) + 32 * len(reply["path"])
        ok = await trio.to_thread.run_sync(
            merkle.verify,
            record.shard_ids[index],
            record.shard_size,
            leaf,
            reply["leaf_data"],
            reply["path"],
        )
        if not ok:
            return self._lost(key, holder, stored, index, "gave a wrong proof")
        self.remote.peers.record(key, True)
        self.remote.ledger.passed(key)
        return OK

    def _failed(self, key: bytes) -> None:
        self.remote.peers.record(key, False)
        self.remote.ledger.failed(key)

    def _lost(self, key: bytes, holder: int, stored: StoredBlock, index: int, why: str) -> str:
        log.warning(
            "peer %s %s for shard %d of block %s: counting it lost",
            key.hex()[:12],
            why,
            index,
            stored.record.block_id.hex()[:16],
        )
        self._failed(key)
        self.blocks.mark_lost(stored.record.block_id, index, holder)
        return LOST
