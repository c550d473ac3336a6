"""Small shard stores to one peer, coalesced into ``StoreShard`` calls of many shards.

A commit's metadata nodes are a few KiB each and every one is N shards on N peers: one
``StoreShard`` per shard made a first sync of a big tree cost ~12 requests a node, each
far dearer at both ends (frame sealing, dispatch, a write transaction on the host) than
its bytes. ``StoreShard`` takes up to 64 shards, so stores of small shards (at most
MAX_BATCH_SHARD bytes) to one peer wait in that peer's queue, and at most
BATCHES_PER_PEER calls run to a peer at once, each taking up to MAX_BATCH_IDS shards
and MAX_BATCH_BYTES bytes from the queue. The shards that arrive while calls are in
flight go together in the next one (as Nagle's algorithm does, and as
blocks/shardbatch.py does for reads); a call that would not be full (GATHER_SHARDS
shards or MAX_BATCH_BYTES) while more blocks are being put (``coming``) waits up to
GATHER_WAIT for theirs, and with nothing more coming an idle peer is sent a shard at once.

Only the transport changes: the caller (blocks/remote.py) still chooses the peer and
records the outcome of each shard, exactly as for a single store. The placing journal
is written per call, not per block: just before a call leaves, its shards are journalled
together (``Journal``), and the call's outcomes are recorded together (``Settle``) — at
most two write transactions per call of up to 64 shards, where journalling each block's
first attempts had cost one transaction per block; calls leaving (or answered) in the
same round of the loop share theirs (blocks/recordwrites.py). A shard that never left the queue was
never journalled, so it leaves nothing to take back. A block's shards
are enqueued together and one task waits for all of them (``store_group``, a
``StoreGroup``): a task per shard was most of a first sync's task switches. Each call takes
one of the peer's store slots (the window ``usable_peers`` weighs), and a shard still
waiting unsent after its *patience* leaves the queue, so a slow peer's shards go
elsewhere as before.

The answer is checked where it arrives: an id we did not send, or an id named twice,
makes the whole answer bad (every shard in the call is then uncertain, as after a lost
answer: it may be there). A shard in neither list is uncertain on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from fluidfs.blocks.peerqueues import PeerQueues, answer_or_error
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_BATCH_BYTES, MAX_BATCH_IDS, MAX_BATCH_SHARD
from fluidfs.peers.connections import Connections

log = logging.getLogger(__name__)

__all__ = ["BATCHES_PER_PEER", "StoreBatches", "StoreGroup", "read_store_answer"]

# StoreShard calls of batched shards running to one peer at once. One, not two as for
# RetrieveShards: the shards that arrive meanwhile wait for the next call, which then
# carries twice as many (a burst of small blocks on 12 in-process hosts: 9.4 -> 17.8
# shards a call, process CPU -13%); a host spends a frame, a dispatch and a write
# transaction per call, whatever it carries.
BATCHES_PER_PEER = 1
# While more small blocks are on their way to the queues (``coming``: sealed, waiting for
# an uploader), a call that would not be full (fewer than GATHER_SHARDS shards and fewer
# than MAX_BATCH_BYTES bytes) waits for them, up to GATHER_WAIT seconds. Without it a
# first sync whose owner seals nodes one after another sent each peer ~8 shards a call
# (1M files: 38,893 calls for 297,936 shards), and a host spends as much on a call as on
# its shards. A full call, not half of one (32): one call per peer runs at a time, so
# each call that leaves half full is a round trip more in a row for a commit's level of
# nodes (1,000 small files: 136 leaves reached each peer in 5 calls, 34/30/34/30/12;
# now 3, 64/64/8). Nothing waits when nothing more is coming: a small commit's last
# nodes go at once.
GATHER_SHARDS = MAX_BATCH_IDS
GATHER_WAIT = 0.05

# The store slot of a peer (blocks/remote.py's window): a call holds one while it runs.
Slot = Callable[[bytes], trio.Semaphore]
# Told how a call to a peer ended for each distinct shard in it, (holder, shard id,
# size, the refusal's code or None if stored, the call's error or None); returns each
# one's outcome, which its waiters get (blocks/remote.py records and journals them, in
# a transaction shared with the calls answered in the same round of the loop).
Settle = Callable[[bytes, list[tuple[int, bytes, int, str | None, Exception | None]]],
                  Awaitable[list[str]]]
# Journals the shards of a call about to leave for a peer, (holder, shard id, size,
# block id) each, in one transaction (shared with the calls leaving in the same round of
# the loop); a shard is sent only once this returned.
Journal = Callable[[list[tuple[int, bytes, int, bytes]]], Awaitable[None]]
# What a shard's waiter is told when journalling its call failed (the disk): it was
# never sent, as a refusal would leave it (nothing to take back, another peer is tried).
NOT_JOURNALLED = "refused"


async def _no_journal(_shards: list[tuple[int, bytes, int, bytes]]) -> None:
    pass


class StoreGroup:
    """Stores enqueued together (one block's shards) that one task waits for: counts of
    those still unsent and still unsettled, each with the event set when it reaches 0."""

    __slots__ = ("all_done", "all_sent", "unsent", "unsettled")

    def __init__(self, size: int) -> None:
        self.unsent = self.unsettled = size
        self.all_sent = trio.Event()
        self.all_done = trio.Event()
        if not size:
            self.all_sent.set()
            self.all_done.set()

    def sent_one(self) -> None:
        """A store of the group was taken into a call (or left the queue unsent)."""
        self.unsent -= 1
        if not self.unsent:
            self.all_sent.set()

    def settled_one(self) -> None:
        """A store of the group has its outcome."""
        self.unsettled -= 1
        if not self.unsettled:
            self.all_done.set()


class _Store:
    """One shard waiting in a peer's queue, then its outcome."""

    __slots__ = ("abandoned", "block_id", "data", "group", "holder", "outcome", "sent",
                 "shard_id", "timeout")

    def __init__(self, holder: int, shard_id: bytes, data: bytes, timeout: float,
                 group: StoreGroup, block_id: bytes) -> None:
        self.holder = holder
        self.shard_id = shard_id
        self.block_id = block_id  # for the placing journal
        self.data = data
        self.timeout = timeout  # for the call that carries it
        self.group = group
        self.sent = False  # taken into a call
        self.outcome = ""  # once settled: what ``Settle`` made of the answer
        self.abandoned = False


class StoreBatches(PeerQueues[tuple[bytes, int], _Store]):
    """Per-peer queues (one per priority) of small shard stores, sent as ``StoreShard``
    calls."""

    def __init__(self, conns: Connections, slot: Slot, settle: Settle,
                 coming: Callable[[], int] = lambda: 0, journal: Journal = _no_journal) -> None:
        super().__init__(BATCHES_PER_PEER)
        self.conns = conns
        self.slot = slot
        self.settle = settle
        self.journal = journal
        # How many small blocks will enqueue their shards soon (see GATHER_SHARDS).
        self.coming = coming
        self._gathering: dict[tuple[bytes, int], trio.Event] = {}  # queues a sender waits on
        self._queued: dict[tuple[bytes, int], int] = {}  # bytes in each queue (``_full``)
        self.calls = 0  # StoreShard calls made for batched shards (status, benchmarks)
        self.shards = 0  # shards they carried

    def usable(self, key: bytes, shard_size: int) -> bool:
        """Whether a shard of *shard_size* bytes for *key* may go in a batch."""
        return self.running and shard_size <= MAX_BATCH_SHARD

    async def store(
        self, key: bytes, holder: int, shard_id: bytes, data: bytes, priority: int, *,
        patience: float, timeout: float, block_id: bytes = b"",
    ) -> str:
        """Store one shard of *block_id* on *key* (holder index *holder*) in a batch: its
        outcome as ``Settle`` gave it, or ``"unsent"`` if no call took it within
        *patience* seconds (it was never sent, nor journalled)."""
        (outcome,) = await self.store_group([(key, holder, shard_id, data)], priority,
                                            patience=patience, timeout=timeout,
                                            block_id=block_id)
        return outcome

    async def store_group(
        self, stores: list[tuple[bytes, int, bytes, bytes]], priority: int, *,
        patience: float, timeout: float, block_id: bytes = b"",
    ) -> list[str]:
        """Store several shards of *block_id*, (peer key, holder index, shard id, data)
        each, in batches, waited for together in this task (one task per block, not one
        per shard): each one's outcome as ``store`` gives it, in order."""
        group = StoreGroup(len(stores))
        waits = []
        for key, holder, shard_id, data in stores:
            wait = _Store(holder, shard_id, data, timeout, group, block_id)
            queue_key = (key, priority)
            self.enqueue(queue_key, wait)
            self._queued[queue_key] = self._queued.get(queue_key, 0) + len(data)
            waits.append(wait)
            gathering = self._gathering.get(queue_key)
            if gathering is not None and self._full(queue_key):
                gathering.set()
        self.poke()
        try:
            with trio.move_on_after(patience):
                await group.all_sent.wait()
        finally:
            for wait in waits:  # timed out or cancelled: the sender skips these
                if not wait.sent and not wait.abandoned:
                    wait.abandoned = True
                    group.sent_one()
                    group.settled_one()
        await group.all_done.wait()  # each call has its own timeout
        return ["unsent" if wait.abandoned else wait.outcome for wait in waits]

    async def send_next(self, queue_key: tuple[bytes, int]) -> bool:
        """Send the next batch of the queue to its peer, holding one of its store slots."""
        key, priority = queue_key
        await self._gather(queue_key)
        async with self.slot(key):
            batch = self._take(queue_key)
            if not batch:
                return False
            await self._call(key, priority, batch)
        return True

    def gathering(self) -> bool:
        """True while some sender waits for more shards (GATHER_SHARDS)."""
        return bool(self._gathering)

    def poke(self) -> None:
        """Send what the queues hold now if nothing more is coming (``coming`` fell to 0:
        the last put ended, or a block's shards joined the queues)."""
        if self._gathering and not self.coming():
            for gathering in self._gathering.values():
                gathering.set()

    async def _gather(self, queue_key: tuple[bytes, int]) -> None:
        """Wait (at most GATHER_WAIT) for the queue to hold a full call (``_full``),
        while more small blocks are coming (``coming``)."""
        if self.queue(queue_key) is None or self._full(queue_key) or not self.coming():
            return
        gathering = self._gathering[queue_key] = trio.Event()
        try:
            with trio.move_on_after(GATHER_WAIT):
                await gathering.wait()
        finally:
            del self._gathering[queue_key]

    def _take(self, queue_key: tuple[bytes, int]) -> dict[bytes, list[_Store]]:
        """The next batch from the queue: live stores, within the call's bounds."""
        queue = self.queue(queue_key)
        batch: dict[bytes, list[_Store]] = {}
        size = 0
        while queue and len(batch) < MAX_BATCH_IDS:
            wait = queue[0]
            if wait.abandoned:
                self._popped(queue_key)
                continue
            if wait.shard_id not in batch:
                if batch and size + len(wait.data) > MAX_BATCH_BYTES:
                    break
                size += len(wait.data)
            self._popped(queue_key)
            wait.sent = True
            wait.group.sent_one()
            batch.setdefault(wait.shard_id, []).append(wait)
        return batch

    def _full(self, queue_key: tuple[bytes, int]) -> bool:
        """Whether the queue holds a full call (GATHER_SHARDS shards or MAX_BATCH_BYTES
        bytes, abandoned stores included): a sender waiting for more need wait no longer."""
        queue = self.queue(queue_key)
        return queue is not None and (len(queue) >= GATHER_SHARDS
                                      or self._queued.get(queue_key, 0) >= MAX_BATCH_BYTES)

    def _popped(self, queue_key: tuple[bytes, int]) -> None:
        """Take the first store off the queue (its bytes off the queue's count)."""
        queue = self.queue(queue_key)
        assert queue is not None
        left = self._queued[queue_key] - len(queue.popleft().data)
        if queue:
            self._queued[queue_key] = left
        else:
            del self._queued[queue_key]

    async def _call(self, key: bytes, priority: int, batch: dict[bytes, list[_Store]]) -> None:
        try:
            await self.journal([(waits[0].holder, sid, len(waits[0].data),
                                 waits[0].block_id) for sid, waits in batch.items()])
        except Exception:  # the disk: an unjournalled shard must not leave
            log.exception("journalling a StoreShard call to %s failed", key.hex()[:12])
            for waits in batch.values():
                for wait in waits:
                    wait.outcome = NOT_JOURNALLED
                    wait.group.settled_one()
            return
        ids = list(batch)
        timeout = max(wait.timeout for waits in batch.values() for wait in waits)
        # A primary shard is a view of its sealed block; a small one is copied here (the
        # single-shard path sends it from its buffer as the frame's tail).
        shards = [{"id": sid, "data": bytes(waits[0].data)} for sid, waits in batch.items()]

        async def ask() -> dict[bytes, str | None]:
            reply = await self.conns.call(key, "StoreShard", {"shards": shards},
                                          timeout=timeout, priority=priority)
            return read_store_answer(ids, reply)

        answer, error = await answer_or_error("StoreShard", key, ask)
        codes = answer or {}
        self.calls += 1
        self.shards += len(ids)
        ended: list[tuple[int, bytes, int, str | None, Exception | None]] = []
        for shard_id, waits in batch.items():
            first = waits[0]
            if error is None and shard_id not in codes:
                ended.append((first.holder, shard_id, len(first.data), None,
                              RpcError("bad_reply", "StoreShard answer left a shard out")))
            else:
                ended.append((first.holder, shard_id, len(first.data), codes.get(shard_id),
                              error))
        try:
            outcomes = await self.settle(key, ended)
        except Exception:  # recording failed (the disk): the shards count as unanswered
            log.exception("recording a StoreShard answer from %s failed", key.hex()[:12])
            outcomes = ["unanswered"] * len(ended)
        for waits, outcome in zip(batch.values(), outcomes, strict=True):
            for wait in waits:
                wait.outcome = outcome
                wait.group.settled_one()


def read_store_answer(ids: list[bytes], reply: dict) -> dict[bytes, str | None]:
    """A ``StoreShard`` answer (already fit to its schema) to the ids we sent: by id,
    None if stored, else the refusal's code; ids in neither list are left out. Raises
    ``RpcError`` (``bad_reply``) for an id not sent or named twice."""
    sent = set(ids)
    codes: dict[bytes, str | None] = {}
    named = [(sid, None) for sid in reply["stored"]]
    named += [(item["id"], item["code"]) for item in reply["refused"]]
    for shard_id, code in named:
        if shard_id not in sent or shard_id in codes:
            raise RpcError("bad_reply", "StoreShard answer names a shard twice or unsent")
        codes[shard_id] = code
    return codes
