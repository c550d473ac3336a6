"""Small shard requests to one peer, coalesced into ``RetrieveShards`` calls.

A fresh machine walking its tree fetches metadata nodes of a few KiB each: K shard
requests per node, ~19 per directory, and each request costs both ends far more (frame
sealing, dispatch, a worker-thread hop for the shard read on the host) than its bytes.
So requests for small shards (at most MAX_BATCH_SHARD bytes) to one peer wait in that
peer's queue, and at most BATCHES_PER_PEER calls run to a peer at once, each taking up
to MAX_BATCH_IDS ids from the queue. An idle peer is asked at once (one id, no added
wait); while calls are in flight, the requests that arrive meanwhile go together in the
next one (as Nagle's algorithm does). The prefetcher's directories in flight
(fs/restore.py) thus share calls per holder without knowing of each other.

Answers are checked where they arrive: an id we did not ask, an id answered twice, or
more than MAX_BATCH_BYTES of shards in all makes the whole answer bad (each request in
it fails as a single request's bad reply would, and counts against the peer the same
way). Each shard is verified against the id it was asked for, all of an answer's in one
worker-thread hop (a hop per shard cost the event loop more than the hashing), or on the
loop itself for an answer of at most VERIFY_INLINE_BYTES (the usual one on a fresh
machine's walk: a few shards of a metadata node, whose hashing costs the loop less than
the hop would); a shard that fails is handed to its request as corrupt. An id in
neither list (the host's answer was full) is asked again on its own. A peer that does
not know the op (``unknown_op``: an older version) is asked one shard per request from
then on; so is a partner whose side is held by its storage provider (the op carries no
``for``), and everything while ``run`` is not running.

What this holds is bounded by the requests waiting: each waits with its own timeout and
is dropped from the queue when it gives up. ``get`` waits in a task of the caller's, with
a cancel scope; ``submit`` (a block read's K shards, blocks/remote.py) has no task: its
caller is told in the sender's step and keeps the deadline itself, abandoning the request
when it passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from fluidfs.blocks import merkle
from fluidfs.blocks.peerqueues import PeerQueues, answer_or_error
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_BATCH_BYTES, MAX_BATCH_IDS, MAX_BATCH_SHARD
from fluidfs.peers.connections import Connections, PeerUnavailable

log = logging.getLogger(__name__)

__all__ = ["BATCHES_PER_PEER", "MAX_BATCH_SHARD", "ShardBatches"]

BATCHES_PER_PEER = 2  # RetrieveShards calls running to one peer at once
BATCH_TIMEOUT = 10.0  # one call; each request also waits with its own timeout
VERIFY_INLINE_BYTES = 64 * 1024  # an answer this small is hashed on the loop (~60 µs)


class _Wait:
    """One shard request waiting in a peer's queue."""

    __slots__ = ("abandoned", "data", "done", "error", "on_done", "shard_id", "verified")

    def __init__(
        self,
        shard_id: bytes,
        on_done: Callable[[_Wait], None] | None = None,
        done: trio.Event | None = None,
    ) -> None:
        self.shard_id = shard_id
        # Set when answered, for a task waiting on it (``get``); a request told through
        # *on_done* (``submit``: most of a fresh machine's walk) has none: making one
        # cost the loop more than the rest of queueing the request.
        self.done = done
        self.data: bytes | None = None  # None once done without error: ask singly
        self.error: Exception | None = None
        self.verified = False  # the bytes hash to shard_id
        self.abandoned = False
        self.on_done = on_done  # told in the sender's step, unless abandoned by then


class ShardBatches(PeerQueues[bytes, _Wait]):
    """Per-peer queues of small shard requests, sent as ``RetrieveShards`` calls."""

    def __init__(self, conns: Connections, limiter: trio.CapacityLimiter) -> None:
        super().__init__(BATCHES_PER_PEER)
        self.conns = conns
        self.limiter = limiter  # verifies answers
        self._unsupported: set[bytes] = set()  # peers that answered unknown_op
        self.calls = 0  # RetrieveShards calls made (status, benchmarks)
        self.shards = 0  # shards they brought

    def usable(self, key: bytes, shard_size: int) -> bool:
        """Whether a shard of *shard_size* bytes from *key* may go in a batch."""
        return (self.running and shard_size <= MAX_BATCH_SHARD
                and key not in self._unsupported and self.conns.store_at(key) is None)

    async def get(
        self, key: bytes, shard_id: bytes, timeout: float
    ) -> tuple[bytes | None, bool]:
        """(The shard's bytes from *key*, whether they hash to *shard_id*), or (None,
        False): ask for it on its own (``RetrieveShard``). Raises ``PeerUnavailable`` or
        ``RpcError`` as ``Connections.call`` does (``not_found`` when the peer says it
        does not hold the shard)."""
        done = trio.Event()
        wait = _Wait(shard_id, done=done)
        self.enqueue(key, wait)
        try:
            with trio.move_on_after(timeout):
                await done.wait()
        finally:
            wait.abandoned = True
        if not done.is_set():
            raise PeerUnavailable(f"peer {key.hex()[:12]}: no answer in {timeout:.1f} s")
        if wait.error is not None:
            raise wait.error
        return wait.data, wait.verified

    def submit(self, key: bytes, shard_id: bytes, on_done: Callable[[_Wait], None]) -> _Wait:
        """Queue a request for *shard_id* from *key* and return it: *on_done* is called
        with it in the step its answer arrives (``data``, ``verified`` and ``error`` as
        ``get`` reads them), unless it was marked ``abandoned`` first. No task waits
        for it: the caller keeps its own deadline and abandons it when that passes
        (blocks/remote.py's ``fetch_shards``, where a task and a cancel scope per shard
        cost a fresh machine's walk more than the shard's share of the call)."""
        wait = _Wait(shard_id, on_done)
        self.enqueue(key, wait)
        return wait

    async def send_next(self, key: bytes) -> bool:
        """Ask *key* for the live requests of its queue (up to MAX_BATCH_IDS ids)."""
        queue = self.queue(key)
        if queue and len(queue) < MAX_BATCH_IDS:
            # One scheduler pass first: the reads started in the step that queued these
            # (a wave of directories, a node's leaves) queue theirs meanwhile.
            await trio.lowlevel.checkpoint()
            queue = self.queue(key)
        batch: dict[bytes, list[_Wait]] = {}
        while queue and len(batch) < MAX_BATCH_IDS:
            wait = queue.popleft()
            if not wait.abandoned:
                batch.setdefault(wait.shard_id, []).append(wait)
        if not batch:
            return False
        await self._call(key, batch)
        return True

    async def _call(self, key: bytes, batch: dict[bytes, list[_Wait]]) -> None:
        ids = list(batch)

        async def ask() -> tuple[dict[bytes, bytes], set[bytes], set[bytes]]:
            reply = await self.conns.call(key, "RetrieveShards", {"ids": ids},
                                          timeout=BATCH_TIMEOUT)
            found, missing = read_answer(ids, reply)
            if sum(len(data) for data in found.values()) <= VERIFY_INLINE_BYTES:
                return found, missing, _verify(found)
            return found, missing, await trio.to_thread.run_sync(
                _verify, found, limiter=self.limiter)

        answer, error = await answer_or_error("RetrieveShards", key, ask)
        if isinstance(error, RpcError) and error.code == "unknown_op":
            # an older peer: one shard per request from now on
            log.info("peer %s does not know RetrieveShards", key.hex()[:12])
            self._unsupported.add(key)
            error = None
        found, missing, verified = answer or ({}, set(), set())
        self.calls += 1
        self.shards += len(found)
        for shard_id, waits in batch.items():
            for wait in waits:
                if error is not None:
                    wait.error = error
                elif shard_id in found:
                    wait.data = found[shard_id]
                    wait.verified = shard_id in verified
                elif shard_id in missing:
                    wait.error = RpcError("not_found", "no such shard of yours here")
                if wait.done is not None:
                    wait.done.set()
                if wait.on_done is not None and not wait.abandoned:
                    wait.on_done(wait)


def _verify(found: dict[bytes, bytes]) -> set[bytes]:
    """The ids whose bytes hash to them."""
    return {sid for sid, data in found.items() if merkle.shard_id(data) == sid}


def read_answer(ids: list[bytes], reply: dict) -> tuple[dict[bytes, bytes], set[bytes]]:
    """A ``RetrieveShards`` answer (already fit to its schema) to the ids we asked:
    (shard bytes by id, ids the peer says it does not hold). Raises ``RpcError``
    (``bad_reply``) for an id not asked, an id answered twice, or shards over
    MAX_BATCH_BYTES in all."""
    asked = set(ids)
    found: dict[bytes, bytes] = {}
    total = 0
    for item in reply["found"]:
        shard_id, data = item["id"], item["data"]
        if shard_id not in asked or shard_id in found:
            raise RpcError("bad_reply", "RetrieveShards answer names a shard twice or unasked")
        total += len(data)
        if total > MAX_BATCH_BYTES:
            raise RpcError("bad_reply", "RetrieveShards answer over its byte bound")
        found[shard_id] = data
    missing = set(reply["missing"])
    if len(missing) != len(reply["missing"]) or not missing <= asked or missing & found.keys():
        raise RpcError("bad_reply", "RetrieveShards answer lists a shard twice or unasked")
    return found, missing
