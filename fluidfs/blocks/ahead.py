"""Small files' blocks rebuilt ahead of a directory copy.

A copy out of a restored tree (``cp -r``, ``rsync``) lists a directory, then opens and
reads its files one after another: each small file's one block was rebuilt only when
its read came, one round trip to K peers per file, one after the other. A listing says
what comes next, so the blocks of the small files it names are queued here (by
fs/filedata.py, from ``readdir``) and rebuilt before their reads, several at once:
through ``BlockStore.fetch``, so their shard reads to one peer travel together in
``RetrieveShards`` calls (blocks/shardbatch.py), decoding runs in worker threads as for
any read, and the plaintext waits in the recent-blocks memory (blocks/recent.py) for
the read, which then finds it there (or joins the rebuild still under way).

Bounds (what a huge directory or a stream of listings can make us spend):

- only blocks of at most ``AHEAD_BLOCK`` bytes (one-block files whose shards travel in
  batched calls) are taken;
- the queue and the rebuilds under way hold at most ``AHEAD_BYTES`` of blocks in all
  (a quarter of what the recent-blocks memory keeps, where rebuilt blocks wait, least
  recently used out); a block that does not fit is not queued (its read rebuilds it,
  as before);
- at most ``AHEAD_AT_ONCE`` rebuilds run at once.

A block that cannot be rebuilt is left to its read, which reports it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

AHEAD_BLOCK = 256 * 1024  # largest block rebuilt ahead (shards of at most 32 KiB at K=8)
AHEAD_BYTES = 8 << 20  # queued and being rebuilt, in all (recent.py keeps 32 MiB)
AHEAD_AT_ONCE = 32  # rebuilds under way at once: their small shard reads share calls


class SmallAhead:
    """A bounded queue of small blocks to rebuild before they are read."""

    def __init__(
        self,
        fetch: Callable[[bytes], Awaitable[object]],
        at_hand: Callable[[bytes], bool],
    ) -> None:
        self.fetch = fetch  # rebuild a block into the recent-blocks memory
        self.at_hand = at_hand  # cached, recent or being rebuilt already
        self._queue: deque[tuple[bytes, int]] = deque()
        self._ids: set[bytes] = set()  # queued or being rebuilt
        self.bytes = 0  # of the blocks queued or being rebuilt
        self._wake = trio.Event()
        self.fetched = 0  # blocks rebuilt ahead (status, tests)
        self.skipped = 0  # blocks not queued: the bound was reached

    def queue(self, blocks: list[tuple[bytes, int]]) -> int:
        """Queue (block id, size) pairs in the order they will be read; how many were
        taken (blocks too large, at hand or already queued are not)."""
        taken = 0
        for block_id, size in blocks:
            if size > AHEAD_BLOCK or block_id in self._ids or self.at_hand(block_id):
                continue
            if self.bytes + size > AHEAD_BYTES:
                self.skipped += 1
                continue
            self._queue.append((block_id, size))
            self._ids.add(block_id)
            self.bytes += size
            taken += 1
        if taken:
            self._wake.set()
        return taken

    async def run(self) -> None:
        """Rebuild what is queued, AHEAD_AT_ONCE at a time, until cancelled."""
        slots = trio.Semaphore(AHEAD_AT_ONCE)

        async def one(block_id: bytes, size: int) -> None:
            try:
                if not self.at_hand(block_id):
                    await self.fetch(block_id)
                    self.fetched += 1
            except Exception as exc:  # the read that needs it reports it
                log.debug("block %s not rebuilt ahead: %s", block_id.hex()[:16], exc)
            finally:
                self._ids.discard(block_id)
                self.bytes -= size
                slots.release()

        async with trio.open_nursery() as nursery:
            while True:
                if not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                await slots.acquire()
                block_id, size = self._queue.popleft()
                nursery.start_soon(one, block_id, size)
