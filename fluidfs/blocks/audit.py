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

Challenges alone cannot catch a host that keeps a good copy to answer them from and
serves corrupt bytes on ``RetrieveShard``. So each cycle also fetches a few whole
shards, picked at random among the challenged ones, within ``retrieve_budget`` bytes
(at least one shard per cycle, however small the budget), and verifies them against
their ids: a corrupt copy catches its holder as a liar (suspects.py).

Holders are audited independently: each in a task of its own, each request with its
own timeout, and a cycle starts the audits of the holders whose last audit has ended
without waiting for the rest, so a hung or slow peer delays no other peer's audits.

Traffic: ``samples`` x (64 KiB + ~300 B) per peer per cycle, plus ``retrieve_budget``
(or one shard) per cycle in all.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import trio

from fluidfs.blocks import merkle
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.blocks.remote import CORRUPT, GONE, GOOD
from fluidfs.net.errors import RpcError
from fluidfs.peers.connections import PeerUnavailable
from fluidfs.store.db import SCAN_BATCH

log = logging.getLogger(__name__)

OK, LOST, UNREACHABLE = "ok", "lost", "unreachable"
# (block id, shard index, shard size) of one shard a holder keeps for us.
Held = tuple[bytes, int, int]


@dataclass
class AuditPolicy:
    """How often and how much to verify."""

    interval: float = 3600.0
    samples: int = 2  # shards challenged per peer per cycle
    timeout: float = 20.0
    retrieve_budget: int = 1 << 20  # bytes of whole shards fetched and verified per cycle


class Auditor:
    """Challenges holders of our shards and acts on the answers."""

    def __init__(self, blocks, remote, policy: AuditPolicy) -> None:
        self.blocks = blocks
        self.remote = remote
        self.policy = policy
        self.cycles = 0
        self.challenges = 0
        self.audit_bytes = 0
        self.fetches = 0  # whole shards fetched and verified
        self.passed: Counter[bytes] = Counter()  # audits passed, per peer key
        self.busy: set[int] = set()  # holders whose audit is still running

    async def run(self) -> None:
        """Audit every interval until cancelled; holders' audits overlap freely."""
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(self.policy.interval)
                if self.blocks.remote is not None:
                    await self.start_cycle(nursery, defaultdict(int))

    async def cycle(self) -> dict[str, int]:
        """One round over every holder, waited for; returns counts per outcome."""
        outcome: dict[str, int] = defaultdict(int)
        async with trio.open_nursery() as nursery:
            await self.start_cycle(nursery, outcome)
        return dict(outcome)

    async def start_cycle(self, nursery: trio.Nursery, outcome: dict[str, int]) -> int:
        """Start auditing, in *nursery*, every holder whose last audit has ended (counts
        per outcome go to *outcome*); return how many were started."""
        holdings = await trio.to_thread.run_sync(self._holdings, self.policy.samples)
        fetches = self._pick_fetches(holdings)
        started = 0
        for holder, items in holdings.items():
            if holder in self.busy:
                continue
            self.busy.add(holder)
            nursery.start_soon(self._audit_holder, holder, items, fetches[holder], outcome)
            started += 1
        self.cycles += 1
        return started

    def _pick_fetches(self, holdings: dict[int, list[Held]]) -> dict[int, list[Held]]:
        """Whole shards to fetch this cycle: random ones among *holdings*, within the
        retrieve budget (at least one, unless the budget is 0: tests only)."""
        if self.policy.retrieve_budget <= 0:
            return defaultdict(list)
        pool = [(holder, item) for holder, items in holdings.items() for item in items]
        random.shuffle(pool)
        chosen: dict[int, list[Held]] = defaultdict(list)
        spent = 0
        for holder, item in pool:
            if spent and spent + item[2] > self.policy.retrieve_budget:
                continue
            chosen[holder].append(item)
            spent += item[2]
        return chosen

    async def _audit_holder(
        self, holder: int, items: list[Held], fetches: list[Held], outcome: dict[str, int]
    ) -> None:
        try:
            for block_id, index, _size in items:
                result = await self.challenge(holder, block_id, index)
                outcome[result] += 1
                if result == UNREACHABLE:
                    return
                if result == LOST:
                    await self._audit_everything_on(holder, outcome)
                    return
            for block_id, index, _size in fetches:
                result = await self.fetch(holder, block_id, index)
                outcome[result] += 1
                if result != OK:
                    return
        finally:
            self.busy.discard(holder)

    def _holdings(self, sample: int | None) -> dict[int, list[Held]]:
        """Shards per remote holder: a random sample of *sample* each, or all of them."""
        chosen: dict[int, list[Held]] = defaultdict(list)
        seen: dict[int, int] = defaultdict(int)
        for key, raw in self.blocks.meta.records("blocks", SCAN_BATCH):
            stored = StoredBlock.decode(key, raw)
            for index, holder in enumerate(stored.holders):
                if holder in (NO_HOLDER, LOCAL_HOLDER):
                    continue
                seen[holder] += 1
                item = (key, index, stored.record.shard_size)
                if sample is None or len(chosen[holder]) < sample:
                    chosen[holder].append(item)
                else:
                    slot = random.randrange(seen[holder])
                    if slot < sample:
                        chosen[holder][slot] = item
        return chosen

    async def _audit_everything_on(self, holder: int, outcome: dict[str, int]) -> None:
        everything = await trio.to_thread.run_sync(self._holdings, None)
        for block_id, index, _size in everything.get(holder, []):
            result = await self.challenge(holder, block_id, index)
            outcome[result] += 1
            if result == UNREACHABLE:
                return

    async def fetch(self, holder: int, block_id: bytes, index: int) -> str:
        """Fetch one whole shard from its holder and verify it; a corrupt copy catches
        the holder as a liar (``on_corrupt``), a missing one is counted lost."""
        stored = self.blocks.load(block_id)
        key = self.remote.peers.key_of(holder)
        if stored is None or key is None or stored.holders[index] != holder:
            return OK  # changed meanwhile
        self.fetches += 1
        result = await self.remote.check_shard(key, stored.record, index)
        if result == GOOD:  # no trust for it: the challenges earn that (remote.read_copy)
            self.audit_bytes += stored.record.shard_size
            self.passed[key] += 1
            self.remote.ledger.passed(key)
            return OK
        if result == CORRUPT:
            self.remote.ledger.failed(key)
            self.remote.on_corrupt(block_id, index, holder)
            return LOST
        if result == GONE:
            return self._lost(key, holder, stored, index, "no longer has it")
        self.remote.ledger.failed(key)
        return UNREACHABLE

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
        self.passed[key] += 1
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
