"""File contents: write-back buffers over sealed blocks.

A file is cut at fixed offsets into blocks. Block *i* of a file is, in order of
precedence: a *dirty* block being written (in memory while small, else a file
under ``<state>/dirty/``), a sealed block named in the block map (or small
data inline in the map), or a hole (zeros). The block's data may be shorter
than the block: what lies past it, up to the file size, reads as zeros.

Writes only touch dirty blocks, so they never wait for sealing. Sealers turn
dirty blocks into stored blocks in the background: when a block is written to
its end, when its file is released, when it has been idle for a while, on
fsync (which waits) and at unmount. Dirty files survive ``kill -9``: on the
next mount they are found and sealed (file names are ``<ino>.<index>``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from fluidfs.blocks.ahead import AHEAD_BLOCK, ListedFiles
from fluidfs.blocks.blockstore import BlockStore, BlockUnavailable
from fluidfs.blocks.record import StoredBlock
from fluidfs.diskspace import is_disk_full
from fluidfs.fs.inode import Inode
from fluidfs.fs.tree import BLOCK_REF, INLINE, Tree

log = logging.getLogger(__name__)

INLINE_MAX = 4096
MEMORY_BLOCK_MAX = 256 * 1024  # a dirty block spills to a file past this size
MEMORY_TOTAL_MAX = 64 * 1024 * 1024  # all in-memory dirty blocks together
IDLE_SEAL_SECONDS = 2.0
READ_AHEAD_BLOCKS = 2
READ_AHEAD_FILES = 64  # files whose read-ahead block ids are remembered (``_read_ahead``)


@dataclass(eq=False)
class DirtyBlock:
    """A block being written: its bytes live in ``buf`` or in the file at ``path``."""

    ino: int
    index: int
    folder: Path  # the dirty directory; ``path`` is built only when a file is needed
    buf: bytearray | None = None
    fd: int | None = None
    length: int = 0
    last_write: float = field(default_factory=time.monotonic)
    lock: trio.Lock = field(default_factory=trio.Lock)
    ready: bool = False  # materialised (old contents in place)
    dead: bool = False  # sealed or dropped: writers must start again
    queued: bool = False

    @property
    def path(self) -> Path:
        """The block's dirty file (most small blocks never have one)."""
        return self.folder / f"{self.ino}.{self.index}"


class _Held:
    """``async with lock`` that takes a free lock at once: trio's ``Lock.acquire``
    yields to the scheduler even when nobody holds the lock, and the write path takes a
    block's lock up to three times per request. A held lock is waited for as before
    (fairly: ``acquire_nowait`` refuses while others wait)."""

    __slots__ = ("lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self.lock = lock

    async def __aenter__(self) -> None:
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


class FileData:
    """Reads, writes, truncates and seals file contents."""

    def __init__(
        self,
        tree: Tree,
        blocks: BlockStore,
        dirty_dir: Path,
        block_size: int,
        limiter: trio.CapacityLimiter,
        sealers: int = 2,
    ) -> None:
        self.tree = tree
        self.blocks = blocks
        self.dirty_dir = dirty_dir
        self.block_size = block_size
        self.limiter = limiter
        self.sealers = sealers
        self.dirty: dict[tuple[int, int], DirtyBlock] = {}
        self._by_ino: dict[int, dict[int, DirtyBlock]] = {}  # the same blocks, per file
        self.memory_bytes = 0
        self._disk_full = False  # the last seal failed for want of space
        self._queue_send, self._queue_recv = trio.open_memory_channel[DirtyBlock](float("inf"))
        self.sealed_bytes = 0
        self.sealed_blocks = 0
        self.on_sealed: Callable[[], None] | None = None
        # ino -> (the block a read last ended in, the ids of the sealed blocks after it):
        # the block map is looked up once a block for the read-ahead, not once a read
        self._ahead: OrderedDict[int, tuple[int, list[bytes]]] = OrderedDict()
        self._listed = ListedFiles()  # small files of recent listings, until one is opened
        dirty_dir.mkdir(parents=True, exist_ok=True)

    # --- background work ----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the sealers and the idle timer until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.sealers):
                nursery.start_soon(self._sealer)
            nursery.start_soon(self._idle_timer)
            task_status.started()

    async def _sealer(self) -> None:
        async for blk in self._queue_recv:
            blk.queued = False
            try:
                await self.seal(blk)
                self._disk_full = False
            except Exception as exc:
                if not is_disk_full(exc, self.dirty_dir):
                    log.exception(
                        "sealing block %d of inode %d failed; will retry", blk.index, blk.ino
                    )
                elif not await self.blocks.evict(0) and not self._disk_full:
                    self._disk_full = True  # one line per episode, not one a second
                    log.error(
                        "the disk holding %s is full: %d bytes written to the mount wait "
                        "to be sealed; they are kept and sealed once there is room",
                        self.dirty_dir.parent,
                        self.pending_bytes(),
                    )
                await trio.sleep(1)
                self._enqueue(blk)

    async def _idle_timer(self) -> None:
        while True:
            await trio.sleep(IDLE_SEAL_SECONDS / 2)
            cutoff = time.monotonic() - IDLE_SEAL_SECONDS
            for blk in list(self.dirty.values()):
                if blk.last_write < cutoff:
                    self._enqueue(blk)

    def _enqueue(self, blk: DirtyBlock) -> None:
        if not blk.queued and not blk.dead:
            blk.queued = True
            self._queue_send.send_nowait(blk)

    async def closed(self, ino: int) -> None:
        """The last writer of *ino* closed it: seal its blocks. A small file's one
        in-memory block is sealed here and now (an inline block map entry joining the
        write-behind batch: cheaper than handing it to a sealer task); any other block
        is queued for the sealers, and so is this one if sealing it here fails."""
        blocks = self._blocks_of(ino)
        if len(blocks) == 1:
            blk = blocks[0]
            inode = self.tree.get(ino)
            if (
                blk.index == 0
                and blk.buf is not None
                and blk.ready
                and not blk.lock.locked()
                and inode is not None
                and inode.size <= INLINE_MAX
                and len(blk.buf) <= INLINE_MAX
            ):
                # The lock is free and nothing below awaits before the block is gone:
                # no other task can see it half sealed, so the lock need not be taken.
                try:
                    dead = self._seal_inline(blk, bytes(blk.buf))
                except Exception:
                    log.exception("sealing inode %d at close failed; queued", ino)
                else:
                    await self._sealed(dead)
                    return
        for blk in blocks:
            self._enqueue(blk)

    def _blocks_of(self, ino: int) -> list[DirtyBlock]:
        return list(self._by_ino.get(ino, {}).values())

    def listed(self, parent: int, inodes: list[Inode], *, restart: bool) -> None:
        """A listing of *parent* named these files: remember the small ones (one block
        each, past the inline size), whose blocks are queued once one of them is opened
        (``opened``; blocks/ahead.py). A listing alone fetches nothing."""
        small = [i.ino for i in inodes if INLINE_MAX < i.size <= AHEAD_BLOCK]
        self._listed.listed(parent, small, restart=restart)

    def opened(self, ino: int) -> int:
        """File *ino* is being opened: if a recent listing named it, queue the blocks of
        the small files listed with it, from it on (``read_ahead``); how many."""
        inos = self._listed.opened(ino)
        if not inos:
            return 0
        return self.read_ahead([inode for i in inos if (inode := self.tree.get(i)) is not None])

    def read_ahead(self, inodes: list[Inode]) -> int:
        """Queue the blocks of the small files among *inodes* (one block each, no
        unsealed data) to be rebuilt before their reads (blocks/ahead.py); how many
        were queued. One block map look-up per file."""
        small = [i for i in inodes
                 if INLINE_MAX < i.size <= AHEAD_BLOCK and i.ino not in self._by_ino]
        if not small:
            return 0
        wanted = []
        with self.tree.db.view() as txn:
            for inode in small:
                value = self.tree.block(inode.ino, 0, txn)
                if value is not None and value[:1] == BLOCK_REF:
                    wanted.append((bytes(value[1:]), inode.size))
        return self.blocks.ahead.queue(wanted)

    def has_dirty(self, ino: int) -> bool:
        """True if *ino* has written data that is not sealed yet."""
        return ino in self._by_ino

    def _add(self, blk: DirtyBlock) -> None:
        self.dirty[(blk.ino, blk.index)] = blk
        self._by_ino.setdefault(blk.ino, {})[blk.index] = blk

    def _remove(self, blk: DirtyBlock) -> None:
        """Forget *blk* if it is still the dirty block at its place."""
        if self.dirty.get((blk.ino, blk.index)) is blk:
            del self.dirty[(blk.ino, blk.index)]
            blocks = self._by_ino[blk.ino]
            del blocks[blk.index]
            if not blocks:
                del self._by_ino[blk.ino]

    def adopt_block_size(self, block_size: int) -> None:
        """Cut files into *block_size* from now on (a restored backup's, before any data)."""
        if self.dirty and block_size != self.block_size:
            raise ValueError("the block size cannot change while data is unsealed")
        self.block_size = block_size

    def pending_bytes(self) -> int:
        """Bytes written but not yet sealed."""
        return sum(blk.length for blk in self.dirty.values())

    # --- recovery ----------------------------------------------------------------------

    async def recover(self) -> int:
        """Adopt dirty files left by a previous run (crash); return how many."""
        names = await trio.to_thread.run_sync(os.listdir, self.dirty_dir)
        found = 0
        for name in names:
            if name.endswith(PART):  # never finished: the sealed block is still the truth
                await trio.to_thread.run_sync((self.dirty_dir / name).unlink)
                continue
            try:
                ino_s, index_s = name.split(".")
                ino, index = int(ino_s), int(index_s)
            except ValueError:
                continue
            blk = DirtyBlock(ino, index, self.dirty_dir)
            path = blk.path
            if path.name != name:  # e.g. "01.0": not a name this code writes
                continue
            inode = self.tree.get(ino)
            if inode is None or not inode.is_reg or index * self.block_size >= inode.size:
                await trio.to_thread.run_sync(path.unlink)
                continue
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDWR)
            length = min(os.fstat(fd).st_size, inode.size - index * self.block_size)
            blk.fd, blk.length, blk.ready = fd, length, True
            self._add(blk)
            self._enqueue(blk)
            found += 1
        return found

    # --- reading -----------------------------------------------------------------------

    async def read(self, inode: Inode, offset: int, size: int) -> bytes | memoryview:
        """Read up to *size* bytes at *offset* (short at end of file). Bytes within one
        block held in memory come as a read-only view of it (no copy)."""
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        parts: list[bytes | memoryview] = []
        bs = self.block_size
        pos = offset
        while pos < end:
            index, start = divmod(pos, bs)
            want = min(bs - start, end - pos)
            data = await self._read_block(inode.ino, index, start, want)
            if len(data) < want:
                data = bytes(data) + bytes(want - len(data))
            parts.append(data)
            pos += want
        self._read_ahead(inode, (end - 1) // bs)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, inode: Inode, index: int) -> None:
        """Start fetching the next few sealed blocks after *index* (sequential reads).

        Their ids are looked up in one transaction when a read first ends in block
        *index* and kept for the reads after it in the same block (a sequential reader
        makes several per block: issue 16 counted three block map transactions a FUSE
        read, two of them these). The ids are only a hint: one gone stale by a write
        meanwhile costs a fetch nobody reads, never a wrong byte, and writes drop them."""
        ahead = self._ahead.get(inode.ino)
        if ahead is None or ahead[0] != index:
            last = (inode.size - 1) // self.block_size
            ids: list[bytes] = []
            if index < last:
                with self.tree.db.view() as txn:
                    for later in range(index + 1, min(index + READ_AHEAD_BLOCKS, last) + 1):
                        value = self.tree.block(inode.ino, later, txn)
                        if value is not None and value[:1] == BLOCK_REF:
                            ids.append(bytes(value[1:]))
            ahead = self._ahead[inode.ino] = (index, ids)
            while len(self._ahead) > READ_AHEAD_FILES:
                self._ahead.popitem(last=False)
        self._ahead.move_to_end(inode.ino)
        for block_id in ahead[1]:
            self.blocks.prefetch(block_id)

    async def _read_block(
        self, ino: int, index: int, start: int, size: int
    ) -> bytes | memoryview:
        blk = self.dirty.get((ino, index))
        if blk is not None and not blk.dead:
            async with _Held(blk.lock):
                if not blk.dead:
                    if blk.buf is not None:
                        return bytes(blk.buf[start : start + size])
                    return await trio.to_thread.run_sync(
                        os.pread, blk.fd, size, start, limiter=self.limiter
                    )
        value = self.tree.block(ino, index)
        if value is None:
            return b""
        if value[:1] == INLINE:
            return value[1 + start : 1 + start + size]
        try:
            return await self.blocks.read(value[1:], start, size, view=True)
        except BlockUnavailable as exc:
            log.error("inode %d block %d unreadable: %s", ino, index, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    # --- writing -----------------------------------------------------------------------

    async def write(self, inode: Inode, offset: int, data: bytes) -> None:
        """Write *data* at *offset* into dirty blocks (the caller updates the size)."""
        self._ahead.pop(inode.ino, None)
        bs = self.block_size
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            index, start = divmod(offset + pos, bs)
            chunk = view[pos : pos + bs - start]
            await self._write_block(inode, index, start, chunk)
            pos += len(chunk)

    async def _write_block(self, inode: Inode, index: int, start: int, chunk: memoryview) -> None:
        end = start + len(chunk)
        while True:
            blk = await self._dirty_block(inode, index)
            if (
                blk.buf is not None
                and end <= MEMORY_BLOCK_MAX
                and not blk.dead
                and not blk.lock.locked()
            ):
                # In memory, free, staying in memory: nothing below awaits, so no other
                # task can come between; the lock need not be taken (a held trio lock
                # with waiters passes to the next one, so free means none waits).
                self._copy_in(blk, start, end, chunk)
                return
            async with _Held(blk.lock):
                if blk.dead:
                    continue
                if blk.buf is not None and end > MEMORY_BLOCK_MAX:
                    await self._spill(blk)
                if blk.buf is not None:
                    self._copy_in(blk, start, end, chunk)
                    return
                await self.blocks.write_to_disk(_pwrite_all, blk.fd, chunk, start,
                                                size=len(chunk))
                self._written(blk, end)
                return

    def _copy_in(self, blk: DirtyBlock, start: int, end: int, chunk: memoryview) -> None:
        """Write *chunk* at *start* into an in-memory block (*end*: where it ends)."""
        buf = blk.buf
        assert buf is not None
        old = len(buf)
        if start > old:
            buf.extend(bytes(start - old))
        buf[start:end] = chunk
        self.memory_bytes += len(buf) - old
        self._written(blk, end)

    def _written(self, blk: DirtyBlock, end: int) -> None:
        """*blk* was written up to *end*: its length, idle clock, and sealing when full."""
        blk.length = max(blk.length, end)
        blk.last_write = time.monotonic()
        if end == self.block_size:
            self._enqueue(blk)

    async def _dirty_block(self, inode: Inode, index: int) -> DirtyBlock:
        """The dirty block for (inode, index), creating it with the old contents."""
        key = (inode.ino, index)
        blk = self.dirty.get(key)
        if blk is not None and not blk.dead:
            return blk
        blk = DirtyBlock(inode.ino, index, self.dirty_dir)
        value = self.tree.block(blk.ino, blk.index)
        if (value is None or value[:1] == INLINE) and self.memory_bytes < MEMORY_TOTAL_MAX:
            # Nothing to fetch or copy: the block is whole before any other task can
            # find it, so its lock need not be taken (a new small file's path).
            self._in_memory(blk, value)
            self._add(blk)
            return blk
        self._add(blk)
        async with _Held(blk.lock):
            try:
                await self._materialise(blk, value)
            except BaseException:
                blk.dead = True
                self._remove(blk)
                raise
        return blk

    def _in_memory(self, blk: DirtyBlock, value: bytes | None) -> None:
        """Make *blk* an in-memory block holding *value*'s inline bytes (or none)."""
        blk.buf = bytearray(value[1:] if value is not None else b"")
        blk.length = len(blk.buf)
        self.memory_bytes += blk.length
        blk.ready = True

    async def _materialise(self, blk: DirtyBlock, value: bytes | None) -> None:
        """Give *blk* its old contents, *value* being its block map entry."""
        if value is not None and value[:1] == BLOCK_REF:
            block_id = value[1:]
            while blk.fd is None:
                try:
                    rebuilt = await self.blocks.fetch(block_id)
                except BlockUnavailable as exc:
                    log.error(
                        "inode %d block %d unreadable for rewrite: %s", blk.ino, blk.index, exc
                    )
                    raise pyfuse3.FUSEError(errno.EIO) from None
                if rebuilt is not None:  # the cache may not keep it: write what we got
                    blk.fd = await self.blocks.write_to_disk(
                        _create_with, blk.path, rebuilt, True, size=len(rebuilt)
                    )
                    break
                source = self.blocks.cache.path(block_id)
                try:
                    blk.fd = await self.blocks.write_to_disk(
                        _copy_to_new, source, blk.path, size=self.block_size
                    )
                except FileNotFoundError:  # evicted between fetch and copy
                    self.blocks.cache.forget(block_id)
            blk.length = os.fstat(blk.fd).st_size
        elif self.memory_bytes < MEMORY_TOTAL_MAX:
            self._in_memory(blk, value)
            return
        else:
            old = value[1:] if value is not None else b""
            blk.fd = await self.blocks.write_to_disk(
                _create_with, blk.path, old, value is not None, size=len(old)
            )
            blk.length = len(old)
        blk.ready = True

    async def _spill(self, blk: DirtyBlock) -> None:
        """Move an in-memory dirty block to its file (it grew large).

        The memory copy is dropped only once the file holds it: on a full disk the
        write fails and the block stays in memory, whole."""
        assert blk.buf is not None
        had_data = self.tree.block(blk.ino, blk.index) is not None
        blk.fd = await self.blocks.write_to_disk(
            _create_with, blk.path, blk.buf, had_data, size=len(blk.buf)
        )
        self.memory_bytes -= len(blk.buf)
        blk.buf = None

    # --- truncation and removal ----------------------------------------------------------

    async def truncate(self, inode: Inode, new_size: int) -> None:
        """Cut the file's data to *new_size* (growing needs nothing: holes read as zeros)."""
        if new_size >= inode.size:
            return
        self._ahead.pop(inode.ino, None)
        bs = self.block_size
        keep = -(-new_size // bs)  # blocks that still hold data
        for blk in [b for b in self._blocks_of(inode.ino) if b.index >= keep]:
            async with _Held(blk.lock):
                self._discard(blk)
        with self.tree.db.write() as txn:
            old = self.tree.cut_blocks(txn, inode.ino, keep)
            dead = self._drop_values(txn, old)
        await self.blocks.release(dead)
        tail = new_size - (keep - 1) * bs if keep else 0
        if keep and tail < bs:
            await self._cut_block(inode, keep - 1, tail)

    async def _cut_block(self, inode: Inode, index: int, length: int) -> None:
        value = self.tree.block(inode.ino, index)
        blk = self.dirty.get((inode.ino, index))
        if blk is None or blk.dead:
            if value is None:
                return
            if value[:1] == INLINE:
                if len(value) - 1 > length:
                    with self.tree.db.write() as txn:
                        self.tree.set_block(txn, inode.ino, index, value[: 1 + length])
                return
            if self.blocks.block_size(value[1:]) <= length:
                return
            blk = await self._dirty_block(inode, index)
        async with _Held(blk.lock):
            if blk.dead:
                return await self._cut_block(inode, index, length)
            if blk.buf is not None:
                if len(blk.buf) > length:
                    self.memory_bytes -= len(blk.buf) - length
                    del blk.buf[length:]
            else:
                await trio.to_thread.run_sync(os.ftruncate, blk.fd, min(blk.length, length))
            blk.length = min(blk.length, length)
            blk.last_write = time.monotonic()

    async def remove(self, ino: int) -> None:
        """Drop all data of a deleted inode."""
        self._ahead.pop(ino, None)
        for blk in self._blocks_of(ino):
            async with _Held(blk.lock):
                self._discard(blk)
        with self.tree.db.write() as txn:
            dead = self._drop_values(txn, self.tree.cut_blocks(txn, ino, 0))
        await self.blocks.release(dead)

    def _discard(self, blk: DirtyBlock) -> None:
        blk.dead = True
        self._remove(blk)
        if blk.buf is not None:
            self.memory_bytes -= len(blk.buf)
            blk.buf = None
        if blk.fd is not None:
            os.close(blk.fd)
            blk.fd = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(blk.path)

    def _drop_values(self, txn, values: list[bytes]) -> list:
        dead = []
        for value in values:
            if value[:1] == BLOCK_REF:
                stored = self.blocks.drop_ref(txn, value[1:])
                if stored is not None:
                    dead.append(stored)
        return dead

    # --- sealing ------------------------------------------------------------------------

    async def seal(self, blk: DirtyBlock) -> None:
        """Turn a dirty block into a stored block and point the block map at it.

        The block's reference and the block map entry that holds it are written in one
        transaction (``BlockStore.put``'s *bind*), and only then does the dirty file move
        into the cache. A crash before that commit leaves the old entry and the dirty
        file, sealed again at the next mount; a crash after it leaves the new entry, and
        perhaps the dirty file beside it, whose sealing again finds the same block."""
        dead: list[StoredBlock] = []
        async with _Held(blk.lock):
            if blk.dead or not blk.ready:
                return
            inode = self.tree.get(blk.ino)
            if inode is None:
                self._discard(blk)
                return
            small = blk.index == 0 and inode.size <= INLINE_MAX
            data: bytes | None = None  # a dirty file is read where it is sealed (put)
            if blk.buf is not None:
                data = bytes(blk.buf)
            elif small:  # perhaps inlined: read it here
                data = await trio.to_thread.run_sync(
                    _read_exact, blk.fd, blk.length, limiter=self.limiter
                )
            if data is not None and small and len(data) <= INLINE_MAX:
                dead = self._seal_inline(blk, data)
            else:

                def bind(txn, block_id: bytes) -> list[StoredBlock]:
                    return self._map(txn, blk, BLOCK_REF + block_id)

                # The dirty file (if any) becomes the cached plaintext: no copy. It is
                # read in the worker thread that seals it (one hop for both).
                source = blk.path if blk.fd is not None else None
                fd, length = blk.fd, blk.length
                await self.blocks.put(
                    data if data is not None else lambda: _read_exact(fd, length), source, bind
                )
                if source is not None:
                    os.close(blk.fd)
                    blk.fd = None
                self._discard(blk)
                self.sealed_bytes += length if data is None else len(data)
                self.sealed_blocks += 1
        await self._sealed(dead)

    def _seal_inline(self, blk: DirtyBlock, data: bytes) -> list[StoredBlock]:
        """Seal *blk* (block 0 of a small file, holding *data*) into an inline block map
        entry; return the blocks left unreferenced. Synchronous: the caller holds the
        block's lock, or knows it free and calls nothing that awaits in between."""
        in_memory = blk.fd is None
        # Bytes only memory held may join the mount's write-behind batch
        # (store/batch.py): a crash loses them with it, as it would have before.
        # A dirty file may not: its entry must be on disk before the file goes. The
        # dirty block goes only once its entry is written: if the write fails, the
        # bytes stay dirty (sealed again later), not lost.
        writes = self.tree.db.batch.write() if in_memory else self.tree.db.write()
        with writes as txn:
            dead = self._map(txn, blk, INLINE + data)
        self._discard(blk)
        if dead:
            self.tree.db.commit_batch()  # no released block may stay referenced
        return dead

    async def _sealed(self, dead: list[StoredBlock]) -> None:
        """After a seal: release the blocks it left unreferenced."""
        if dead:
            await self.blocks.release(dead)
        if self.on_sealed is not None:
            self.on_sealed()

    def _map(self, txn, blk: DirtyBlock, value: bytes) -> list[StoredBlock]:
        """Point *blk*'s block map entry at *value* in *txn*; return the blocks left
        unreferenced (to release after the commit)."""
        old = self.tree.set_block(txn, blk.ino, blk.index, value)
        return self._drop_values(txn, [old] if old is not None else [])

    async def seal_inode(self, ino: int) -> None:
        """Seal every dirty block of *ino* now (fsync)."""
        for blk in self._blocks_of(ino):
            await self.seal(blk)

    async def seal_all(self) -> None:
        """Seal everything (unmount). A block that cannot be sealed (a full disk) stays
        in its dirty file, which the next mount recovers; the others are still sealed."""
        for blk in list(self.dirty.values()):
            try:
                await self.seal(blk)
            except Exception as exc:
                if not is_disk_full(exc, self.dirty_dir):
                    raise
        if self.dirty:
            log.error(
                "the disk holding %s is full: %d bytes stay unsealed in %s and are sealed "
                "at the next mount",
                self.dirty_dir.parent,
                self.pending_bytes(),
                self.dirty_dir,
            )


# A dirty file gets its real name (the one recover() adopts after a crash) only once it
# holds the block's old contents in full: a copy cut short by kill -9 would otherwise be
# sealed on the next mount in place of the intact block, losing acknowledged data. When
# the old contents are already stored (sealed or inline), the copy is also synced before
# the rename, so that a reboot cannot leave a half-written file under the real name.
PART = ".part"


def _create(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)


def _publish(fd: int, part: Path, path: Path, durable: bool) -> int:
    if durable:
        os.fdatasync(fd)
    os.rename(part, path)
    return fd


def _new_dirty_file(path: Path, fill: Callable[[int], None], durable: bool) -> int:
    """A new dirty file at *path*, filled by *fill(fd)* under a temporary name (see PART)."""
    part = path.with_name(path.name + PART)
    fd = _create(part)
    try:
        fill(fd)
        return _publish(fd, part, path, durable)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite all of *data* (a nearly full disk can take a write in part)."""
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


def _create_with(path: Path, data: bytes | bytearray, durable: bool) -> int:
    """A new dirty file at *path* holding *data*."""

    def fill(fd: int) -> None:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], written)

    return _new_dirty_file(path, fill, durable)


def _copy_to_new(source: Path, target: Path) -> int:
    """A new dirty file at *target* holding a copy of the cached block *source*."""

    def fill(fd: int) -> None:
        with open(source, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            copied = 0
            while copied < size:
                n = os.copy_file_range(src.fileno(), fd, size - copied, copied, copied)
                if n == 0:
                    break
                copied += n

    return _new_dirty_file(target, fill, True)


def _read_exact(fd: int, length: int) -> bytes:
    data = os.pread(fd, length, 0)
    if len(data) < length:
        data += bytes(length - len(data))
    return data
