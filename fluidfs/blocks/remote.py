"""Shards on peers: place a block's shards on distinct peers, fetch them back, delete them.

Placement samples distinct peers weighted by trust and free promised space (see
peers/placement.py), skipping peers that already have their fill of stores in
flight, so one slow peer never holds up uploads to the others. Fetching asks K
holders, each with its own timeout, verifies every shard against its id, and asks
another holder whenever one fails or is late (much slower than the others' answers),
so one slow or dead peer never stalls a read and healthy peers are asked for K shards,
no more: on a full line every shard asked beyond K takes the place of a needed one.
Small shards (metadata nodes) to one peer go together in ``RetrieveShards`` calls while
``run`` runs (blocks/shardbatch.py); each is still checked and counted on its own.

A holder our records name that returns a shard failing its id check is reported
(``on_corrupt``): the blockstore counts everything it holds for us lost and marks it
caught (suspects.py); it is put in ``caught`` and no shard is placed on it again, and
``on_liar`` is told so the node ends the agreement. Audits alone cannot tell such a host
from an honest one (it answers them from the good copy it keeps): the auditor also
fetches a few whole shards each cycle (audit.py).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import trio

from fluidfs.blocks import merkle
from fluidfs.blocks.codec import BlockCodec, BlockError, BlockRecord, CorruptBlock
from fluidfs.blocks.gc import Collector
from fluidfs.blocks.hop import BLOCK_HOPS
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER
from fluidfs.blocks.shardbatch import ShardBatches
from fluidfs.blocks.storebatch import StoreBatches
from fluidfs.net import envelope
from fluidfs.net.bandwidth import UPLOAD
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.copysets import groups, prefer_group
from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.placement import rank

log = logging.getLogger(__name__)

STORE_TIMEOUT = 30.0
MAX_INFLIGHT_PER_PEER = 4  # stores outstanding to one peer at once
SLOT_WAIT = 1.0  # how long a shard waits for a busy peer before going elsewhere
# How long a small shard waits unsent in its peer's batch queue before going elsewhere:
# longer than SLOT_WAIT, as it waits behind a whole call of up to 64 shards.
BATCH_WAIT = 5.0
BUSY_WEIGHT = 0.05  # placement weight factor for a peer whose window is full
FETCH_TIMEOUT = 5.0
# More for each of our shard requests already running to the same peer: a reader keeps
# blocks in flight, and on a 20 Mbit/s uplink each 512 KiB answer queued ahead takes
# about 0.2 s, far more on a loaded machine. A request that times out is asked again,
# and the answer on its way is sent all the same: a timeout that counts the queue ahead
# as silence spends the line twice. A silent peer is still passed over early: a late
# request gets its hedge after ``_patience``, not after the timeout.
FETCH_TIMEOUT_QUEUED = 2.0
EXTRA_FETCHES = 2  # at most this many requests beyond K, each only for a late or failed one
# A shard request is late when it has run HEDGE_FACTOR times the median time of the good
# answers so far, plus HEDGE_SLACK (so jitter on a fast line starts none); before any
# answer, after FIRST_ANSWER_PATIENCE. "Run" counts from when the request was sent or,
# if later, from the last answer that peer gave us: a peer sends our answers one after
# another up one line, so a request queued behind our others there is waiting for its
# turn, not for a slow peer, and a hedge for it would only spend the downlink on a
# shard that gets cancelled (all the same sent in full).
HEDGE_FACTOR = 2.0
HEDGE_SLACK = 0.25
FIRST_ANSWER_PATIENCE = FETCH_TIMEOUT / 2

# Told (shard index, holder) when a shard turns up on a peer its record does not name.
FoundShard = Callable[[int, int], None]
# Told (block id, shard index, holder) when a recorded holder returns a corrupt copy.
CorruptShard = Callable[[bytes, int, int], None]
# Outcomes of fetching one shard from a holder: a good copy, none (it says it has not got
# it), a copy that fails its id check (a lie), or no answer.
GOOD, GONE, CORRUPT, UNREACHABLE = "good", "gone", "corrupt", "unreachable"
STORED, REFUSED, UNANSWERED = "stored", "refused", "unanswered"
# Failures after which a sent shard may be on the peer all the same.
UNCERTAIN_CODES = frozenset({"timeout", "connection_lost", "bad_reply", "internal"})


def _ignore(_key: bytes) -> None:
    pass


def _median(values: list[float]) -> float:
    """The median of *values* (not empty), as ``statistics.median`` gives it: that
    module loads ``fractions`` and ``decimal`` (1.7 MB from a cold disk) at a fresh
    mount, for this alone."""
    ordered = sorted(values)
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def _patience(took: list[float]) -> float:
    """How long a shard request may run before it counts as late, given how long the
    good answers so far took."""
    if not took:
        return FIRST_ANSWER_PATIENCE
    return HEDGE_FACTOR * _median(took) + HEDGE_SLACK


def _late_at(waiting: list[float], took: list[float]) -> float:
    """When the first of the requests that started waiting at *waiting* turns late."""
    return min(waiting) + _patience(took) if waiting else math.inf


def _window() -> trio.Semaphore:
    """Stores in flight to one peer."""
    return trio.Semaphore(MAX_INFLIGHT_PER_PEER)


class RemoteShards:
    """The network side of the blockstore."""

    def __init__(
        self,
        conns: Connections,
        peers: PeerList,
        ledger: Ledger,
        codec: BlockCodec,
        limiter: trio.CapacityLimiter,
        *,
        even_placement: bool = False,
        on_liar: Callable[[bytes], None] = _ignore,
    ) -> None:
        self.conns = conns
        self.peers = peers
        self.ledger = ledger
        self.codec = codec
        self.limiter = limiter
        self._slots: dict[bytes, trio.Semaphore] = defaultdict(_window)
        self._fetching: Counter[bytes] = Counter()  # shard requests running, per peer
        # When each peer last answered one of our shard requests (trio time): requests
        # queued behind it there wait from then (see HEDGE_FACTOR).
        self._answered: dict[bytes, float] = {}
        self.journal: Collector | None = None  # journals shards in flight (crash safety)
        self.even_placement = even_placement  # benchmarks: ignore trust and space
        self.on_result: Callable[[bytes, bool], None] = peers.record
        self.on_corrupt: CorruptShard = lambda _block, _index, _holder: None
        # Told the same when a recorded holder says it no longer has the shard.
        self.on_missing: CorruptShard = lambda _block, _index, _holder: None
        self.caught: set[bytes] = set()  # served corrupt shards: placed on no more
        self.on_liar = on_liar  # told the key of a holder caught serving a corrupt shard
        # Refused a store as over its quota: placed on no more until it frees some room
        # (a delete), or reconciliation (blocks/reconcile.py) settles who holds what.
        self.full: set[bytes] = set()
        self.batches = ShardBatches(conns, limiter)
        self.store_batches = StoreBatches(conns, self._slots.__getitem__, self._settle_batch,
                                          journal=self._journal_sending)
        self.single_stores = 0  # StoreShard calls of one shard (batched ones: store_batches)
        self.single_retrieves = 0  # RetrieveShard calls (batched ones: batches)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Send small shard requests and stores in batches until cancelled (without this
        running, each shard is one ``RetrieveShard`` or ``StoreShard``)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store_batches.run)
            await nursery.start(self.batches.run)
            task_status.started()

    def store_requests(self) -> dict[str, int]:
        """StoreShard calls made so far and the shards they carried (status, benchmarks)."""
        return {"calls": self.single_stores + self.store_batches.calls,
                "shards": self.single_stores + self.store_batches.shards}

    def retrieve_requests(self) -> dict[str, int]:
        """RetrieveShard(s) calls made so far and the shards they brought (status,
        benchmarks: a fresh machine's walk is made of these)."""
        return {"calls": self.single_retrieves + self.batches.calls,
                "shards": self.single_retrieves + self.batches.shards}

    def failing_holders(self) -> set[int]:
        """Holder indexes that do not count as reachable now: the agreement with the
        holder is failing (its last audit or contact failed) or gone, or the peer is
        forgotten. Agreed holders still count until their tolerance ends; this is the
        other half of the truth, shown beside them."""
        failing = set()
        for agreement in self.ledger:
            if agreement.active and agreement.failing_since is None:
                continue
            peer = self.peers.get(agreement.peer)
            if peer is not None:
                failing.add(peer.index)
        return failing

    def usable_peers(self, shard_size: int) -> list[bytes]:
        """Peers that can take a shard now, in weighted random order (best first)."""
        weights = {}
        for agreement in self.ledger:
            key = agreement.peer
            if agreement.room < shard_size or key not in self.peers or self.conns.backing_off(key):
                continue
            if key in self.caught or key in self.full or self.peers.caught_left(key):
                continue
            if self.even_placement:
                weights[key] = 1.0
                continue
            free = agreement.room / max(agreement.they_host, 1)
            weights[key] = self.peers.weight(key) * free
            if self._slots[key].value == 0:  # its window is full: try it last
                weights[key] *= BUSY_WEIGHT
        return rank(weights)

    def placement_groups(self) -> list[list[bytes]]:
        """The live agreements cut into groups of N peers (peers/copysets.py)."""
        members = ((agreement.created, agreement.peer) for agreement in self.ledger.active())
        return groups(members, self.codec.total)

    def _holder_keys(self, indexes: set[int]) -> list[bytes]:
        return [self.peers.by_index[i] for i in indexes if i in self.peers.by_index]

    async def place(
        self,
        record: BlockRecord,
        shards: list[bytes],
        holders: list[int],
        priority: int = UPLOAD,
        *,
        avoid: frozenset[int] = frozenset(),
    ) -> None:
        """Store every shard without a holder on a distinct peer; fill in *holders*.

        *priority*: the stores' turn under the upload limit (net/bandwidth.py): new data
        by default, a repair passes its block's ``repair_priority``. *avoid*: holder
        indexes that get none of these shards either (an emergency repair's failing
        holders, which still keep a copy)."""
        holding = {h for h in holders if h not in (NO_HOLDER, LOCAL_HOLDER)}
        candidates = [
            key
            for key in self.usable_peers(record.shard_size)
            if self.peers.get(key).index not in holding | avoid
        ]
        if not self.even_placement:  # keep the block within one placement group
            candidates = prefer_group(candidates, self.placement_groups(),
                                      self._holder_keys(holding))
        missing = [i for i, h in enumerate(holders) if h == NO_HOLDER]
        first = dict(zip(missing, candidates, strict=False))
        del candidates[: len(first)]
        if self.store_batches.usable(b"", record.shard_size):
            # journalled by the StoreShard calls that carry them, a call at a time
            await self._place_batched(record, shards, holders, first, candidates, priority)
            return
        # Each shard's first peer is chosen now and all first attempts are journalled in
        # one transaction; a retry on another peer journals itself (``_store``).
        if self.journal is not None:
            self.journal.placing_many([
                (self.peers.get(key).index, record.shard_ids[i], record.shard_size,
                 record.block_id)
                for i, key in first.items()
            ])

        async def store_one(index: int) -> None:
            key = first.get(index)
            journaled = True
            while key is not None:
                stored = await self._store(
                    key, record.shard_ids[index], shards[index], record.block_id, priority,
                    journaled=journaled,
                )
                if stored:
                    holders[index] = self.peers.get(key).index
                    return
                key = candidates.pop(0) if candidates else None
                journaled = False

        async with trio.open_nursery() as nursery:
            for index in missing:
                nursery.start_soon(store_one, index)

    async def _place_batched(
        self, record: BlockRecord, shards: list[bytes], holders: list[int],
        first: dict[int, bytes], candidates: list[bytes], priority: int,
    ) -> None:
        """``place`` for a block of small shards: all go in batches and this one task
        waits for them (a task per shard was most of a first sync's task switches).
        Shards that failed go to the next candidates together, round after round. Each
        attempt is journalled by the call that carries it (storebatch.py ``Journal``):
        one left unsent (a slow peer) was never journalled."""
        tries = first
        while tries:
            stores = [(key, self.peers.get(key).index, record.shard_ids[index], shards[index])
                      for index, key in tries.items()]
            await self._deletes_ended([(holder, shard_id) for _, holder, shard_id, _ in stores])
            outcomes = await self.store_batches.store_group(
                stores, priority, patience=BATCH_WAIT, timeout=STORE_TIMEOUT,
                block_id=record.block_id)
            retries: dict[int, bytes] = {}
            for index, (_, holder, _, _), outcome in zip(tries, stores, outcomes, strict=True):
                if outcome == STORED:
                    holders[index] = holder
                elif candidates:
                    retries[index] = candidates.pop(0)
            tries = retries

    async def _store(
        self,
        key: bytes,
        shard_id: bytes,
        data: bytes,
        block_id: bytes = b"",
        priority: int = UPLOAD,
        *,
        journaled: bool = False,
    ) -> bool:
        """Store one shard on *key*; True once it confirmed. *journaled*: the attempt
        is in the placing journal already (``place`` journals a block's first attempts
        together)."""
        holder = self.peers.get(key).index
        if self.store_batches.usable(key, len(data)):
            return await self._store_batched(key, holder, shard_id, data, block_id, priority,
                                             journaled=journaled)
        slot = self._slots[key]
        acquired = False
        with trio.move_on_after(SLOT_WAIT):
            await slot.acquire()
            acquired = True
        if not acquired:  # a slow peer: this shard goes to another one
            if journaled and self.journal is not None:
                self.journal.refused(holder, shard_id)  # never sent: nothing to collect
            return False
        try:
            if self.journal is not None and not journaled:
                self.journal.placing(holder, shard_id, len(data), block_id)
            await self._deletes_ended([(holder, shard_id)])
            outcome = await self._store_on(key, shard_id, data, priority)
            self._journal_outcome(holder, shard_id, len(data), outcome)
            return outcome == STORED
        finally:
            slot.release()

    async def _store_batched(
        self, key: bytes, holder: int, shard_id: bytes, data: bytes, block_id: bytes,
        priority: int, *, journaled: bool,
    ) -> bool:
        """``_store`` for a small shard: it goes to *key* in a ``StoreShard`` call with
        others (blocks/storebatch.py), which journals it; recorded just as a single
        store."""
        await self._deletes_ended([(holder, shard_id)])
        outcome = await self.store_batches.store(key, holder, shard_id, data, priority,
                                                 patience=BATCH_WAIT, timeout=STORE_TIMEOUT,
                                                 block_id=block_id)
        if outcome == "unsent":  # a slow peer: this shard goes to another one
            if journaled and self.journal is not None:
                self.journal.refused(holder, shard_id)  # never sent: nothing to collect
            return False
        return outcome == STORED  # recorded and journalled by ``_settle_batch``

    async def _deletes_ended(self, stores: list[tuple[int, bytes]]) -> None:
        """Wait until no delete of these journalled (holder, shard id) stores is on its way
        (gc.py ``wait_deletes``): one landing after the store would take the copy the
        record is about to name."""
        if self.journal is not None:
            await self.journal.wait_deletes(stores)

    async def _journal_sending(self, shards: list[tuple[int, bytes, int, bytes]]) -> None:
        """Journal the shards of a batched ``StoreShard`` call about to leave, (holder,
        shard id, size, block id) each, in one transaction shared with the calls leaving
        in the same round of the loop (storebatch.py ``Journal``)."""
        if self.journal is not None:
            await self.journal.placing_joined(shards)

    async def _settle_batch(
        self, key: bytes, ended: list[tuple[int, bytes, int, str | None, Exception | None]]
    ) -> list[str]:
        """The outcomes of a batched ``StoreShard`` call's shards (storebatch.py
        ``Settle``): each counted as a single store's answer would be, and all
        journalled in one transaction (shared with the calls answered in the same round
        of the loop)."""
        outcomes = []
        for _holder, _shard_id, size, code, error in ended:
            if isinstance(error, (PeerUnavailable, RpcError)):
                outcomes.append(self._failed(key, error))
            elif error is not None:  # not a failure a call raises: the shard may be there
                outcomes.append(UNANSWERED)
            else:
                outcomes.append(self._store_answered(key, size, set() if code is None
                                                     else {code}))
        if self.journal is not None:
            await self.journal.outcomes_joined([(holder, shard_id, size, outcome) for
                                                (holder, shard_id, size, _, _), outcome in
                                                zip(ended, outcomes, strict=True)])
        return outcomes

    def _journal_outcome(self, holder: int, shard_id: bytes, size: int, outcome: str) -> None:
        """Record in the placing journal how a store that was journalled as placing ended."""
        if self.journal is None:
            return
        if outcome == STORED:
            self.journal.stored(holder, shard_id)
        elif outcome == REFUSED:
            self.journal.refused(holder, shard_id)
        else:
            self.journal.unanswered(holder, shard_id, size)

    def _failed(self, key: bytes, exc: PeerUnavailable | RpcError) -> str:
        """The outcome of a store whose call failed with *exc*."""
        log.info("storing a shard on %s failed: %s", key.hex()[:12], exc)
        self.on_result(key, False)
        if isinstance(exc, RpcError) and exc.code not in UNCERTAIN_CODES:
            return REFUSED
        # Unreachable covers timeouts and lost connections too: the shard may be
        # there. Deleting a shard the peer never got costs one request.
        return UNANSWERED

    def _store_answered(self, key: bytes, size: int, codes: set[str]) -> str:
        """The outcome of a store the peer answered: stored (no *codes*) or refused."""
        if not codes:
            self.ledger.add_use(key, size)
            self.on_result(key, True)
            self.full.discard(key)
            return STORED
        log.info("peer %s refused a shard: %s", key.hex()[:12], ", ".join(sorted(codes)))
        self.on_result(key, False)
        if "over_quota" in codes:  # its idea of our usage is larger than ours: stop using it
            self.full.add(key)
        return REFUSED

    async def _store_on(
        self, key: bytes, shard_id: bytes, data: bytes, priority: int = UPLOAD
    ) -> str:
        """STORED, REFUSED (the peer answered that it did not store it) or UNANSWERED
        (it may have: the call timed out, the connection was lost, the answer was bad)."""
        self.single_stores += 1
        try:
            reply = await self.conns.call(
                key,
                "StoreShard",
                # the shard goes from its buffer (a primary shard is a view of the
                # sealed block) straight into the frame: no copy on the way
                {"shards": [{"id": shard_id, "data": envelope.TAIL}]},
                timeout=STORE_TIMEOUT,
                priority=priority,
                tail=data,
            )
        except (PeerUnavailable, RpcError) as exc:
            return self._failed(key, exc)
        if shard_id in reply["stored"]:
            return self._store_answered(key, len(data), set())
        return self._store_answered(key, len(data), {r["code"] for r in reply["refused"]} or {""})

    async def fetch(
        self, record: BlockRecord, holders: list[int], on_found: FoundShard | None = None
    ) -> bytes:
        """Rebuild a block's plaintext from its holders; raise BlockError if it cannot be."""
        plain, _ = await self.fetch_parsed(record, holders, on_found=on_found)
        return plain

    async def fetch_parsed(
        self,
        record: BlockRecord,
        holders: list[int],
        parse: Callable[[bytes], Any] | None = None,
        on_found: FoundShard | None = None,
    ) -> tuple[bytes, Any]:
        """(plaintext, what *parse* made of it, or the exception it raised; None without
        *parse*), the block rebuilt from its holders, opened and parsed in one
        worker-thread hop (a hop costs the loop more than opening a small block);
        BlockError if it cannot be rebuilt.

        The holders' shards are checked in that same hop: one hop a block, not one a
        shard (issue 16: the hops cost the event loop more than the hashing), and each
        shard is hashed against its id only if the block does not open
        (``_check_and_open``). A holder is credited for its answer only once the block
        opened with it or its shard checked out; one whose shard fails is dealt with as
        any holder returning a corrupt shard (``on_corrupt``), and the block is fetched
        again without it."""
        holders = list(holders)
        while True:
            sources: dict[int, bytes] = {}
            good = await self.fetch_shards(record, holders, on_found=on_found, sources=sources)
            async with self.limiter:
                opened_block, bad = await BLOCK_HOPS.run(
                    self._check_and_open, record, good, sources, parse)
            for index, key in sources.items():
                if index in bad:
                    self._corrupt(key, record, index)
                    peer = self.peers.get(key)
                    if peer is not None:
                        self.on_corrupt(record.block_id, index, peer.index)
                    holders[index] = NO_HOLDER  # not asked again for this block
                else:
                    self.on_result(key, True)
            if opened_block is not None:
                return opened_block

    def _check_and_open(
        self,
        record: BlockRecord,
        good: dict[int, bytes],
        unchecked: dict[int, bytes],
        parse: Callable[[bytes], Any] | None = None,
    ) -> tuple[tuple[bytes, Any] | None, set[int]]:
        """(``opened(plaintext, parse)``, no bad shards), or (None, the indexes of the
        shards in *unchecked* that fail their check). Runs in a worker thread.

        The block is opened first and the shards are hashed only if that fails: opening
        authenticates every ciphertext byte the K shards carry (and the zero padding), so
        a shard that fails its own check cannot yield a block that opens (hashing them
        all first cost as much as a third of opening, issue 16). The plaintext is not
        hashed against the block id either: the AEAD under the block's content key,
        with the id as associated data, proves the same (codec ``open``).
        Shard lengths are checked first (cheap, and the erasure decoder wants them
        right); shards beyond the K that open the block are checked on their own."""
        wrong = {i for i in unchecked if len(good[i]) != record.shard_size}
        if not wrong:
            used = sorted(good)[: record.needed]
            try:
                plaintext = self.codec.open(record, good, verified=True, check_id=False)
            except CorruptBlock:
                pass  # some shard lied: which, its check tells (below)
            else:
                extra = {i for i in unchecked if i not in used
                         and not self.codec.check_shard(record, i, good[i])}
                return opened(plaintext, parse), extra
        bad = {i for i in unchecked if not self.codec.check_shard(record, i, good[i])}
        if not bad:  # every shard checks out and the block does not open
            return opened(self.codec.open(record, good, verified=True, check_id=False),
                          parse), bad
        return None, bad

    async def fetch_shards(
        self,
        record: BlockRecord,
        holders: list[int],
        extra: int = EXTRA_FETCHES,
        *,
        verify: bool = True,
        on_found: FoundShard | None = None,
        sources: dict[int, bytes] | None = None,
    ) -> dict[int, bytes]:
        """K shards of the block, each verified against its id; BlockError if unreachable.

        K requests go out at once; up to *extra* more go out, one for each request
        that turns late (see ``_patience``), cutting tail latency for readers without
        spending the line on shards that get cancelled (repair, which is not waited
        on, passes 0). A failed request is replaced at once, always. With
        *verify* False the shards come back unchecked: for callers that check what
        they compute from them instead (repair checks each recreated shard's id).
        If the named holders do not give K shards, every other peer we have an
        agreement with is asked for the missing ones (see ``_search``); *on_found* is
        told where each one turned up. With *sources*, the shards from recorded holders
        come back unchecked and their holders uncredited, and *sources* gets the holder
        each came from (index -> peer key): the caller checks them, credits the holders
        of the good ones and reports the others (``fetch``); shards found by the search
        are checked as they arrive.
        """
        order = [i for i, h in enumerate(holders) if h not in (NO_HOLDER, LOCAL_HOLDER)]
        good: dict[int, bytes] = {}
        send, recv = trio.open_memory_channel[tuple[int, bytes | None, float]](len(order))
        in_flight: dict[int, float] = {}  # shard index -> when its request went out
        keys: dict[int, bytes | None] = {}  # shard index -> the peer asked for it
        covered: set[int] = set()  # late requests an extra one was started for
        took: list[float] = []  # how long each good answer took

        def waiting_since(index: int) -> float:
            """When the request for *index* last saw its peer idle or answering us."""
            key = keys[index]
            answered = self._answered.get(key, -math.inf) if key is not None else -math.inf
            return max(in_flight[index], answered)

        def settle(index: int, key: bytes | None, data: bytes | None) -> None:
            """A request is over (*data*: its good shard, or None): hand it to the loop."""
            if key is not None:
                self._fetching[key] -= 1
                if not self._fetching[key]:
                    del self._fetching[key]
            now = trio.current_time()
            elapsed = now - waiting_since(index)
            if data is not None and key is not None:
                self._answered[key] = now
            send.send_nowait((index, data, elapsed))

        async def fetch_one(index: int, key: bytes | None, single: bool = False) -> None:
            data = None
            try:
                if key is not None:
                    ahead = self._fetching[key] - 1
                    data = await self._get_shard(
                        key, record, index, recorded=True,
                        verify=verify and sources is None, credit=sources is None,
                        timeout=FETCH_TIMEOUT + ahead * FETCH_TIMEOUT_QUEUED, single=single)
            except BaseException:
                if key is not None:
                    self._fetching[key] -= 1
                    if not self._fetching[key]:
                        del self._fetching[key]
                raise
            settle(index, key, data)

        # Small shards from peers that take RetrieveShards: queued in the peer's batch
        # with no task of their own (``ShardBatches.submit``); this loop keeps their
        # deadlines. index -> (the queued request, its deadline).
        batched: dict[int, tuple[Any, float]] = {}

        def answered(index: int, wait: Any) -> None:
            """The batch's sender (or this loop, at the deadline) ends a queued request."""
            del batched[index]
            wait.abandoned = True
            key = keys[index]
            assert key is not None
            if wait.error is None and wait.data is None:  # left out of the answer: ask singly
                nursery.start_soon(fetch_one, index, key, True)
                return
            settle(index, key, self._batched_outcome(key, record, index, wait,
                                                     credit=sources is None))

        try:
            async with trio.open_nursery() as nursery:
                queue = list(order)
                hedged = 0

                def start_next() -> None:
                    index = queue.pop(0)
                    now = in_flight[index] = trio.current_time()
                    key = keys[index] = self.peers.key_of(holders[index])
                    if key is None:
                        nursery.start_soon(fetch_one, index, key)
                        return
                    self._fetching[key] += 1  # counted now: the next block's order sees it
                    if self.batches.usable(key, record.shard_size):
                        timeout = FETCH_TIMEOUT + (self._fetching[key] - 1) * FETCH_TIMEOUT_QUEUED
                        wait = self.batches.submit(
                            key, record.shard_ids[index], lambda wait: answered(index, wait))
                        batched[index] = (wait, now + timeout)
                    else:
                        nursery.start_soon(fetch_one, index, key)

                for _ in range(min(record.needed, len(queue))):
                    start_next()
                while in_flight and len(good) < record.needed:
                    hedge_at = math.inf
                    if queue and hedged < extra:
                        hedge_at = _late_at(
                            [waiting_since(i) for i in in_flight if i not in covered], took)
                    if batched:
                        hedge_at = min(hedge_at, min(end for _, end in batched.values()))
                    with trio.move_on_at(hedge_at):
                        index, data, elapsed = await recv.receive()
                        del in_flight[index]
                        if data is not None:
                            good[index] = data
                            took.append(elapsed)
                            source = keys[index]
                            if sources is not None and source is not None:
                                # Listed only once taken: an answer arriving in the same
                                # step as the K-th is dropped with the nursery, and a source
                                # without its shard broke the caller's check.
                                sources[index] = source
                        elif queue:  # a failure: ask the next holder at once
                            start_next()
                        continue
                    # No answer before the oldest request became late (or a queued one's
                    # deadline passed: it failed, as a timeout does): one more request for
                    # each late one (at most *extra* in all), the others keep running.
                    now = trio.current_time()
                    for index, (wait, end) in list(batched.items()):
                        if end <= now:
                            wait.error = PeerUnavailable(
                                f"peer {keys[index].hex()[:12]}: no answer in time")
                            answered(index, wait)
                    for late in sorted(in_flight, key=waiting_since):
                        if late in covered or waiting_since(late) + _patience(took) > now:
                            continue
                        if not queue or hedged >= extra:
                            break
                        covered.add(late)
                        hedged += 1
                        start_next()
                nursery.cancel_scope.cancel()
        finally:
            for index, (wait, _) in batched.items():  # not needed any more
                wait.abandoned = True
                self._fetching[keys[index]] -= 1
                if not self._fetching[keys[index]]:
                    del self._fetching[keys[index]]

        if len(good) < record.needed:
            await self._search(record, holders, good, on_found)
        if len(good) < record.needed:
            raise BlockError(
                f"only {len(good)} of {record.needed} needed shards reachable ({len(order)} placed)"
            )
        return good

    async def _search(
        self,
        record: BlockRecord,
        holders: list[int],
        good: dict[int, bytes],
        on_found: FoundShard | None,
    ) -> None:
        """Look for the block's missing shards on every peer we have an agreement with.

        A holder list can be out of date: an old snapshot names the holders its blocks
        had when it was taken, and repair may have moved shards since. Shards are ids,
        so any peer can be asked; one that does not have it says so, which costs it no
        trust. Missing shards are looked for in waves, as many indexes at once as shards
        are still needed, each from all peers at once, until K good shards are in hand:
        a fresh machine reading a snapshot whose holders lag pays one round trip per
        wave, not one per shard.
        """
        peers = [
            a.peer
            for a in self.ledger.active()
            if a.peer in self.peers and not self.conns.backing_off(a.peer)
        ]
        missing = [index for index in range(record.total) if index not in good]
        while missing and len(good) < record.needed:
            wave, missing = (missing[: record.needed - len(good)],
                             missing[record.needed - len(good):])
            found: dict[int, tuple[bytes, bytes]] = {}

            async def look(index: int, found: dict = found) -> None:
                named = holders[index]
                asked = [k for k in peers if self.peers.get(k).index != named]
                hit = await self._ask_all(record, index, asked)
                if hit is not None:
                    found[index] = hit

            async with trio.open_nursery() as nursery:
                for index in wave:
                    nursery.start_soon(look, index)
            for index, (key, data) in sorted(found.items()):
                good[index] = data
                log.info(
                    "shard %d of block %s found on %s, not where it was recorded",
                    index,
                    record.block_id.hex()[:16],
                    key.hex()[:12],
                )
                if on_found is not None:
                    on_found(index, self.peers.get(key).index)

    async def locate(self, record: BlockRecord, indexes: list[int]) -> dict[int, bytes]:
        """Which peers hold shards *indexes* of the block: {index: peer key}, each proven
        by the peer answering an audit of it (a leaf and its Merkle path, a few hundred
        bytes, not the shard). Every peer with a live agreement, but one caught serving a
        corrupt shard, is asked for every index at once; a peer that has not got a shard
        says so, which costs it nothing. For holder lists that lag (a fresh machine's
        restored snapshot): a shard someone holds need not be rebuilt and sent again."""
        peers = [a.peer for a in self.ledger.active()
                 if a.peer in self.peers and a.peer not in self.caught
                 and not self.conns.backing_off(a.peer)]
        found: dict[int, bytes] = {}

        async def ask(index: int, key: bytes) -> None:
            shard_id = record.shard_ids[index]
            leaf = random.randrange(merkle.leaf_count(record.shard_size))
            try:
                proof = await self.conns.call(
                    key, "AuditShard", {"id": shard_id, "leaf": leaf, "nonce": os.urandom(32)},
                    timeout=FETCH_TIMEOUT)
            except (PeerUnavailable, RpcError):
                return
            if index not in found and merkle.verify(
                    shard_id, record.shard_size, leaf, proof["leaf_data"], proof["path"]):
                found[index] = key

        async with trio.open_nursery() as nursery:
            for index in indexes:
                for key in peers:
                    nursery.start_soon(ask, index, key)
        return found

    async def _ask_all(
        self, record: BlockRecord, index: int, peers: list[bytes]
    ) -> tuple[bytes, bytes] | None:
        """The first of *peers* to return a good copy of shard *index*, with the copy."""
        result: list[tuple[bytes, bytes]] = []

        async with trio.open_nursery() as nursery:

            async def ask(key: bytes) -> None:
                data = await self._get_shard(key, record, index, recorded=False)
                if data is not None and not result:
                    result.append((key, data))
                    nursery.cancel_scope.cancel()

            for key in peers:
                nursery.start_soon(ask, key)
        return result[0] if result else None

    async def _get_shard(
        self, key: bytes, record: BlockRecord, index: int, *, recorded: bool, verify: bool = True,
        credit: bool = True, timeout: float = FETCH_TIMEOUT, single: bool = False,
    ) -> bytes | None:
        """Shard *index* of the block from peer *key*, or None.

        A wrong answer always counts against the peer, and when our records say the
        peer holds that shard (*recorded*) it is reported to ``on_corrupt`` (and a
        ``not_found`` to ``on_missing``). Not
        answering, or not having it, counts only when *recorded*; a peer merely asked
        in a search owes us nothing. With *verify* False the bytes are not checked
        (the caller checks what it computes from them); with *credit* False a good answer
        earns the peer nothing yet (the caller credits it once it checked the bytes).
        *single*: ask with ``RetrieveShard`` even if the shard could go in a batch.
        """
        outcome, data = await self._retrieve(key, record, index, recorded=recorded, verify=verify,
                                             credit=credit, timeout=timeout, single=single)
        peer = self.peers.get(key) if recorded else None
        if outcome == CORRUPT and peer is not None:
            self.on_corrupt(record.block_id, index, peer.index)
        elif outcome == GONE and peer is not None:
            self.on_missing(record.block_id, index, peer.index)
        return data if outcome == GOOD else None

    async def check_shard(self, key: bytes, record: BlockRecord, index: int) -> str:
        """Fetch shard *index* from its recorded holder *key* and verify it: GOOD, GONE,
        CORRUPT or UNREACHABLE (see ``read_copy``)."""
        outcome, _data = await self.read_copy(key, record, index)
        return outcome

    async def read_copy(
        self, key: bytes, record: BlockRecord, index: int
    ) -> tuple[str, bytes | None]:
        """Shard *index* from its recorded holder *key*, verified: (outcome, the bytes if
        GOOD). Nothing is reported to ``on_corrupt``: the caller decides. A failure counts
        against the peer; a good copy earns it nothing (these are checks run in sweeps —
        audits, ``check --read-data`` — and dozens of them would inflate its trust)."""
        return await self._retrieve(key, record, index, recorded=True, verify=True,
                                    credit=False)

    async def _retrieve(
        self,
        key: bytes,
        record: BlockRecord,
        index: int,
        *,
        recorded: bool,
        verify: bool,
        credit: bool = True,
        timeout: float = FETCH_TIMEOUT,
        single: bool = False,
    ) -> tuple[str, bytes | None]:
        shard_id = record.shard_ids[index]
        hashed: bool | None = None  # whether the batch found the bytes hash to the id
        try:
            data = None
            if not single and self.batches.usable(key, record.shard_size):
                data, hashed = await self.batches.get(key, shard_id, timeout)
            if data is None:
                hashed = None
                self.single_retrieves += 1
                reply = await self.conns.call(key, "RetrieveShard", {"id": shard_id},
                                              timeout=timeout)
                data = reply["data"]
        except (PeerUnavailable, RpcError) as exc:
            if recorded:
                log.info("retrieving a shard from %s failed: %s", key.hex()[:12], exc)
                self.on_result(key, False)
            gone = isinstance(exc, RpcError) and exc.code == "not_found"
            return (GONE if gone else UNREACHABLE), None
        if hashed is not None:
            good = hashed and len(data) == record.shard_size
        elif verify:
            good = await trio.to_thread.run_sync(
                self.codec.check_shard, record, index, data, limiter=self.limiter)
        else:
            good = True
        if not good:
            self._corrupt(key, record, index)
            return CORRUPT, None
        if recorded and credit:
            self.on_result(key, True)
        return GOOD, data

    def _batched_outcome(
        self, key: bytes, record: BlockRecord, index: int, wait: Any, *, credit: bool
    ) -> bytes | None:
        """The good shard a request ``fetch_shards`` queued in a batch (``ShardBatches.
        submit``) brought from its recorded holder *key*, or None; counted and reported
        as ``_get_shard`` does for a recorded holder (the answer was hashed on arrival)."""
        peer = self.peers.get(key)
        if wait.error is not None:
            log.info("retrieving a shard from %s failed: %s", key.hex()[:12], wait.error)
            self.on_result(key, False)
            gone = isinstance(wait.error, RpcError) and wait.error.code == "not_found"
            if gone and peer is not None:
                self.on_missing(record.block_id, index, peer.index)
            return None
        if not wait.verified or len(wait.data) != record.shard_size:
            self._corrupt(key, record, index)
            if peer is not None:
                self.on_corrupt(record.block_id, index, peer.index)
            return None
        if credit:
            self.on_result(key, True)
        return wait.data

    def _corrupt(self, key: bytes, record: BlockRecord, index: int) -> None:
        """Peer *key* returned a shard *index* of the block that fails its check."""
        log.warning(
            "peer %s returned a corrupt shard %d of block %s",
            key.hex()[:12],
            index,
            record.block_id.hex()[:16],
        )
        self.on_result(key, False)

    def give_back(self, holder: int, size: int) -> None:
        """Our usage figure for *holder* counted *size* bytes twice: take them off."""
        key = self.peers.key_of(holder)
        if key is not None:
            self.ledger.add_use(key, -size)

    async def delete_ids(self, holder: int, shard_ids: list[bytes], size: int) -> bool:
        """Ask one holder to drop shards of ours; True once it has confirmed."""
        key = self.peers.key_of(holder)
        if key is None:
            return True  # a peer we forgot: nothing to ask
        try:
            await self.conns.call(key, "DeleteShard", {"ids": shard_ids})
        except (PeerUnavailable, RpcError) as exc:
            log.info("deleting shards on %s failed: %s", key.hex()[:12], exc)
            return False
        self.ledger.add_use(key, -size)
        self.full.discard(key)
        return True


def opened(plain: bytes, parse: Callable[[bytes], Any] | None) -> tuple[bytes, Any]:
    """(plain, parse(plain) or the exception it raised; None without *parse*): for
    worker threads that open a block and parse it in one hop."""
    if parse is None:
        return plain, None
    try:
        return plain, parse(plain)
    except Exception as exc:  # handed to the caller, who knows what it means
        return plain, exc
