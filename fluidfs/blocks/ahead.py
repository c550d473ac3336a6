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
- at most ``AHEAD_AT_ONCE`` rebuilds run at once, started ``AHEAD_WAVE`` together.

A block that cannot be rebuilt is left to its read, which reports it.

A listing alone queues nothing: ``find``, ``ls -R`` and ``du`` list every directory and
read no file, and rebuilding the blocks they name fetched data nobody read (every small
file of a fresh machine's tree, for a walk that needs only metadata). ``ListedFiles``
remembers what recent listings named instead, and a directory's small files are queued
once one of them is opened (a copy opens the first right after listing), a window of
``LISTED_WINDOW`` files at a time from the one opened, topped up as the copy reaches its
middle. What it remembers is bounded: ``LISTED_MAX`` files in all, the least recently
listed directories forgotten first (their files are then read without help, as before).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable

import trio

from fluidfs.concurrency import start_in_waves

log = logging.getLogger(__name__)

AHEAD_BLOCK = 256 * 1024  # largest block rebuilt ahead (shards of at most 32 KiB at K=8)
AHEAD_BYTES = 8 << 20  # queued and being rebuilt, in all (recent.py keeps 32 MiB)
AHEAD_AT_ONCE = 32  # rebuilds under way at once: their small shard reads share calls
AHEAD_WAVE = 8  # started together once this many are free (their shard reads share calls)
LISTED_MAX = 16384  # small files remembered from recent listings, in all
LISTED_WINDOW = 256  # files queued from the one opened on; topped up from half way


class ListedFiles:
    """Small files that recent listings named, per directory and in listing order,
    until one of them is opened (see the module's docstring)."""

    def __init__(self, limit: int = LISTED_MAX, window: int = LISTED_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._dirs: OrderedDict[int, list[int]] = OrderedDict()  # least recent first
        self._where: dict[int, tuple[int, int]] = {}  # file -> (directory, position)
        self._queued_to: dict[int, int] = {}  # directory -> positions queued so far
        self._count = 0  # positions in all the lists (a hard link may hold several)

    def __len__(self) -> int:
        return self._count

    def listed(self, parent: int, files: list[int], *, restart: bool) -> None:
        """A listing of *parent* named *files* (small ones, in order); *restart* if it
        is a new listing from the first entry, not the next part of one."""
        if restart:
            self._forget(parent)
        if not files:  # a directory without small files is not remembered at all
            return
        names = self._dirs.get(parent)
        if names is None:
            names = self._dirs[parent] = []
        else:
            self._dirs.move_to_end(parent)
        for ino in files:
            self._where[ino] = (parent, len(names))
            names.append(ino)
        self._count += len(files)
        while self._count > self.limit and self._dirs:
            self._forget(next(iter(self._dirs)))

    def opened(self, ino: int) -> list[int]:
        """*ino* is being opened: the files of its listing to queue now (none if it was
        not listed, or the window ahead of it is queued already)."""
        where = self._where.get(ino)
        if where is None:
            return []
        parent, pos = where
        names = self._dirs[parent]
        done = self._queued_to.get(parent, 0)
        if pos + self.window // 2 < done:
            return []
        end = pos + self.window
        self._queued_to[parent] = end
        return names[max(pos, done) : end]

    def _forget(self, parent: int) -> None:
        names = self._dirs.pop(parent, [])
        self._count -= len(names)
        for ino in names:
            if self._where.get(ino, (None,))[0] == parent:
                del self._where[ino]
        self._queued_to.pop(parent, None)


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
        """Rebuild what is queued, at most AHEAD_AT_ONCE at a time, until cancelled.

        They start in waves of AHEAD_WAVE (or all that are queued, if fewer): rebuilds
        started in one step ask for their shards in that step, so the requests to each
        peer go out together in one ``RetrieveShards`` call; one started whenever
        another ended went alone, one call to each of K peers for its one shard there."""

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

        async def queued() -> None:
            self._wake = trio.Event()
            await self._wake.wait()

        await start_in_waves(lambda: len(self._queue),
                             lambda: functools.partial(one, *self._queue.popleft()),
                             queued, AHEAD_AT_ONCE, AHEAD_WAVE)
