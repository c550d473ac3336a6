"""Loading a big restored directory on a fresh machine leaves the event loop free: its
entries are written in worker threads, a bounded batch per write transaction, and no
write transaction of meta.lmdb is opened on the loop (issue 15).

Machine a commits one directory of FILES files (some holding data, so their block maps
take references); machine b adopts the commit from a copy of a's shard store (real LMDB,
real block store, real decoding) and loads that directory.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import threading
import time
from pathlib import Path

from inproc import LocalStore, Metadata

from fluidfs import keys
from fluidfs.fs import restore
from fluidfs.fs.tree import ROOT_INO

BS = 16 * 1024
RING = keys.KeyRing(keys.generate())
FILES = 1500
WITH_DATA = 40  # of them holding 200 bytes (the rest empty)
LOOP_CPU_PER_ENTRY = 8e-6  # loop CPU seconds per entry: 3-6 µs measured, 14 when it wrote them


class CountedWrites:
    """Counts meta.lmdb write transactions, and those opened on the loop's thread."""

    def __init__(self, store: LocalStore) -> None:
        self.real = store.db.write
        self.loop_thread = threading.get_ident()
        self.total = 0
        self.on_loop = 0
        store.db.write = self.write

    def write(self):
        self.total += 1
        if threading.get_ident() == self.loop_thread:
            self.on_loop += 1
        return self.real()


async def test_loading_a_big_restored_directory_never_holds_the_loop(tmp_path: Path) -> None:
    a = LocalStore(tmp_path / "a", RING, BS)
    try:
        folder = a.mkdir(ROOT_INO, "big")
        for i in range(FILES):
            if i < WITH_DATA:
                await a.create(folder, f"f{i:05d}", os.urandom(200))
            else:
                a.new_inode(folder, f"f{i:05d}", stat.S_IFREG | 0o644)
        ref = (await Metadata(a).commit()).ref
    finally:
        a.close()
    shutil.copytree(tmp_path / "a" / "shards", tmp_path / "b" / "shards")
    b = LocalStore(tmp_path / "b", RING, BS)
    try:
        meta = Metadata(b)
        meta.holders.learn([ref])
        with b.db.write() as txn:
            meta.index.adopt(txn, ref)
        meta.restorer.adopt_root((await meta.index.load(ref.block_id)).commit)
        await meta.restorer.ensure(ROOT_INO)
        big = b.tree.lookup(ROOT_INO, b"big")
        nodes_before = meta.index.count()

        writes = CountedWrites(b)
        loop_cpu = time.thread_time()  # this thread's CPU: the loop's, not the workers'
        await meta.restorer.ensure(big)
        loop_cpu = time.thread_time() - loop_cpu
        names = sorted(name for _, name, _ in b.tree.entries(big))
        assert names == [f"f{i:05d}".encode() for i in range(FILES)]
        assert meta.restorer.pending() == []
        nodes = meta.index.count() - nodes_before  # the directory's metadata nodes
        assert writes.on_loop == 0, f"{writes.on_loop} write transactions on the loop"
        batches = math.ceil(FILES / restore.WRITE_BATCH)
        assert writes.total <= nodes + batches, (
            f"{writes.total} write transactions for {nodes} nodes and {FILES} entries"
        )
        assert loop_cpu < LOOP_CPU_PER_ENTRY * FILES, (
            f"the loop spent {loop_cpu * 1000:.0f} ms of CPU loading {FILES} entries"
        )
        for i in range(WITH_DATA):  # the block maps came back with their references
            ino = b.tree.lookup(big, f"f{i:05d}".encode())
            assert len(await b.read(ino)) == 200
    finally:
        b.close()
