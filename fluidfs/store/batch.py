"""Write-behind for the mount's metadata: many requests' writes in one LMDB transaction.

A small-file create is eight FUSE requests, four of which write ``meta.lmdb``; each write
transaction's commit writes every B-tree page it touched. ``WriteBatch`` keeps one write
transaction (the *batch*) open on the trio thread and runs each request's writes in a
nested transaction inside it: a request that fails leaves nothing behind (its nested
transaction is aborted), one that succeeds joins the batch. The batch commits

- when it is ``MAX_AGE`` seconds old (checked by ``run`` every ``TICK`` and by every
  request that joins it) or holds ``MAX_WRITES`` requests;
- before any other transaction of the trio thread (``Database.read``/``write`` commit it
  first, so every reader and writer outside the mount's requests sees what they did,
  and nothing is ordered after a write it might depend on);
- as soon as a worker thread waits for the writer lock (it would otherwise wait up to
  ``MAX_AGE``); while one waits, requests write in transactions of their own;
- on ``commit()``: fsync and fsyncdir, unmount, and anything that must be on disk
  before a side effect (a block released, a dirty file removed).

Requests read through the batch (``view``), so the mount sees its own writes; other
threads read what is committed. A crash (kill -9) loses the batch: at most the last
``MAX_AGE`` seconds of requests that no fsync covered, each request whole or not at
all, never a torn one (LMDB commits are atomic).

A full disk must not lose what was acknowledged, and a batch's commit fails as a whole
when a page write does: so batching is for a disk with room. While the environment's
room (``spare``: its disk's free space, less if a file-size limit is nearer) is under
``LOW_SPACE``, requests commit one by one, each before it is answered, and one that
does not fit gets its error (ENOSPC to the user) instead of a success later undone. Room
is looked at every ``TICK`` (by ``run``, or by the next request if ``run`` is late), and
a batch open when room runs low is committed at that look, while data writers still
leave it ``DATA_RESERVE`` (diskspace.py). A batch whose commit fails all the same is
lost; ``on_lost`` callbacks then drop what memory holds of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import trio

from fluidfs.diskspace import LOW_SPACE, room

log = logging.getLogger(__name__)

MAX_AGE = 1.0  # seconds a request's write may wait in the batch
MAX_WRITES = 1000  # requests per batch
TICK = 0.05  # seconds between age checks (and between looks for a waiting thread)


class WriteBatch:
    """The open batch of one LMDB environment (see the module docstring)."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.on_lost: list[Callable[[], None]] = []
        self._txn: lmdb.Transaction | None = None
        self._active: lmdb.Transaction | None = None  # the request's nested transaction
        self._alone: lmdb.Transaction | None = None  # or its own, outside any batch
        self._owner: int | None = None  # the thread whose requests batch (the trio thread)
        self._opened_at = 0.0
        self._writes = 0
        self._waiting = 0  # threads waiting for the writer lock
        self._waiting_lock = threading.Lock()
        self._low = False  # room was under LOW_SPACE at the last look: no batching
        self._looked_at = -TICK  # when room was last looked at (monotonic)
        self.commits = 0  # batches committed (for tests and benchmarks)
        # Changes whenever what the open batch holds may differ from what the requests
        # since the last change wrote: a batch committed or lost, a request aborted. A
        # memo of "already written in this batch" is valid while the epoch stays.
        self.epoch = 0

    def is_open(self) -> bool:
        """True while a batch holds uncommitted writes."""
        return self._txn is not None

    def owned_here(self) -> bool:
        """True if the calling thread is the one whose batch is open."""
        return self._txn is not None and self._owner == threading.get_ident()

    def elsewhere(self) -> bool:
        """True on a thread other than the one that batches (the trio thread, once it
        has opened a batch): one that must not write while a batch is open."""
        return self._owner is not None and self._owner != threading.get_ident()

    def in_request(self) -> bool:
        """True while a request's transaction is open."""
        return self._active is not None or self._alone is not None

    def joins(self, txn: lmdb.Transaction) -> bool:
        """True if *txn* is a request's nested transaction of the open batch (what it
        writes commits with the batch, or is aborted, which changes ``epoch``)."""
        return txn is self._active and txn is not None

    def write(self) -> _Request:
        """A transaction for one request's writes, joining the batch when it can (use
        as a context manager: it commits when the block ends without error)."""
        return _Request(self)

    def view(self) -> lmdb.Transaction | None:
        """The transaction a read on this thread must use to see the batch and the
        open request's own writes, or None."""
        if self._owner != threading.get_ident():
            return None
        if self._active is not None:
            return self._active
        return self._alone if self._alone is not None else self._txn

    def commit(self) -> None:
        """Commit the batch now (no-op if none is open)."""
        txn, self._txn = self._txn, None
        if txn is None:
            return
        if self._active is not None:
            self._txn = txn
            raise RuntimeError("a batch cannot commit inside one of its requests")
        self.epoch += 1
        try:
            txn.commit()
        except BaseException:
            log.error("a batch of %d metadata writes could not be committed and is lost",
                      self._writes)
            for lost in self.on_lost:
                lost()
            raise
        self.commits += 1

    def spare(self) -> int:
        """Bytes the environment's file can still grow by: its disk's free space, or
        what the process's file-size limit (RLIMIT_FSIZE) leaves, if that is less.
        Blocking but short (two stats)."""
        path = Path(self.env.path())
        try:
            return room(path, path / "data.mdb")
        except OSError:
            return 0  # cannot tell: take no risk with acknowledged writes

    def low(self) -> bool:
        """True while requests commit one by one for want of room (see the module
        docstring); looks at the disk if the last look is ``TICK`` old."""
        now = time.monotonic()
        if now - self._looked_at >= TICK:
            self._looked_at = now
            low = self.spare() < LOW_SPACE
            if low != self._low:
                self._low = low
                if low:
                    log.warning("less than %d MiB free for %s: metadata writes commit one "
                                "by one until there is room", LOW_SPACE >> 20, self.env.path())
                else:
                    log.info("room again for %s: metadata writes are batched", self.env.path())
        return self._low

    def begin_elsewhere(self) -> lmdb.Transaction:
        """A write transaction for a thread other than the batch's: ask the batch to
        commit (``run`` sees the request within ``TICK``) and wait for the lock."""
        with self._waiting_lock:
            self._waiting += 1
        try:
            return self.env.begin(write=True)
        finally:
            with self._waiting_lock:
                self._waiting -= 1

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Commit the batch when it is due, until cancelled (then commit what is left)."""
        task_status.started()
        try:
            while True:
                await trio.sleep(TICK)
                low = self.low()
                if self._txn is not None and self._active is None and (
                    low or self._waiting or time.monotonic() - self._opened_at >= MAX_AGE
                ):
                    self.commit()
        finally:
            if self._active is None and self.owned_here():
                self.commit()


class _Request:
    """One request's transaction (``WriteBatch.write``): a nested transaction of the
    batch, or one of its own while a thread waits for the writer lock or room is low
    (committed before the request is answered: a failure reaches the caller). A class, not a
    generator context manager: there is one per request that writes, and a generator
    costs several times as much to enter and leave."""

    __slots__ = ("batch", "own", "txn")

    def __init__(self, batch: WriteBatch) -> None:
        self.batch = batch
        self.txn: lmdb.Transaction | None = None
        self.own = False

    def __enter__(self) -> lmdb.Transaction:
        b = self.batch
        now = time.monotonic()
        low = b._low if now - b._looked_at < TICK else b.low()  # one call a request less
        if b._txn is not None and (
            low or b._waiting or b._writes >= MAX_WRITES or now - b._opened_at >= MAX_AGE
        ):
            b.commit()
        if low or b._waiting:
            b._owner = threading.get_ident()
            self.own = True
            self.txn = b._alone = b.env.begin(write=True)
            return self.txn
        if b._txn is None:
            b._txn = b.env.begin(write=True)
            b._owner = threading.get_ident()
            b._opened_at = now
            b._writes = 0
        self.txn = b._active = b.env.begin(write=True, parent=b._txn)
        return self.txn

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
        txn = self.txn
        assert txn is not None
        b = self.batch
        if self.own:  # commit, or abort on an error, as ``with env.begin()`` does
            try:
                if kind is None:
                    txn.commit()
                else:
                    txn.abort()
            finally:
                b._alone = None
            return
        try:
            if kind is None:
                txn.commit()
                b._writes += 1
            else:
                b.epoch += 1
                txn.abort()
        finally:
            b._active = None
