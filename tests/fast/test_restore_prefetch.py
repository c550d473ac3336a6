"""A fresh machine walking a restored tree (what ``find`` does) fetches directories ahead
of the walk, several at once, instead of one round trip per directory (issue 15).

Machine a commits a tree of directories; machine b adopts it from a copy of a's shard
store (real LMDB, real block store, real decoding) whose reads take FETCH_DELAY each,
as a fetch from peers over a network would, and walks it depth-first in name order.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing
from inproc import LocalStore, Metadata, slow_jump_clock, until

from fluidfs import keys
from fluidfs.blocks.blockstore import BlockUnavailable
from fluidfs.fs.restore import BACKGROUND_LOADERS, PREFETCH_WAVE
from fluidfs.fs.tree import ROOT_INO

BS = 16 * 1024
RING = keys.KeyRing(keys.generate())
FETCH_DELAY = 0.05
TOP, BELOW = 4, 8  # directories in the root, and in each of those


async def committed_tree(root: Path) -> tuple[object, dict[str, list[str]]]:
    """Commit on machine a a root of TOP directories of BELOW directories of 2 files;
    return the commit's reference and the tree as {directory path: sorted names}."""
    a = LocalStore(root / "a", RING, BS)
    try:
        meta = Metadata(a)
        tree: dict[str, list[str]] = {"": []}
        for i in range(TOP):
            top = a.mkdir(ROOT_INO, f"t{i}")
            tree[""].append(f"t{i}")
            tree[f"t{i}"] = []
            for j in range(BELOW):
                below = a.mkdir(top, f"b{j}")
                tree[f"t{i}"].append(f"b{j}")
                tree[f"t{i}/b{j}"] = ["f0", "f1"]
                for name in ("f0", "f1"):
                    await a.create(below, name, f"{i}/{j}/{name}".encode())
        result = await meta.commit()
    finally:
        a.close()
    return result.ref, tree


class SlowReads:
    """Block reads that take FETCH_DELAY (a network round trip), counting how many run
    at once."""

    def __init__(self, store: LocalStore) -> None:
        self.real = store.blocks.read_parsed
        self.in_flight = 0
        self.most = 0
        self.count = 0
        store.blocks.read_parsed = self.read

    async def read(self, *args, **kw):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.count += 1
        try:
            await trio.sleep(FETCH_DELAY)
            return await self.real(*args, **kw)
        finally:
            self.in_flight -= 1


async def walk(b: LocalStore, meta: Metadata) -> dict[str, list[str]]:
    """Depth-first in name order, loading each directory before listing it (as FUSE
    opendir/readdir do): {directory path: sorted names}."""
    seen: dict[str, list[str]] = {}

    async def visit(ino: int, path: str) -> None:
        await meta.restorer.ensure(ino)
        entries = sorted(b.tree.entries(ino), key=lambda e: e[1])
        seen[path] = [name.decode() for _, name, _ in entries]
        for _, name, child in entries:
            if b.tree.get(child).is_dir:
                await visit(child, f"{path}/{name.decode()}".lstrip("/"))

    await visit(ROOT_INO, "")
    return seen


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Virtual time that moves only while nothing runs (inproc.slow_jump_clock)."""
    return slow_jump_clock()


async def test_a_walk_of_a_restored_tree_fetches_directories_ahead_at_once(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """On virtual time, so that the walk's time is its fetches' round trips, not the
    CPU a loaded machine lends it (on real time, the bound failed at load 30)."""
    ref, expected = await committed_tree(tmp_path)
    shutil.copytree(tmp_path / "a" / "shards", tmp_path / "b" / "shards")
    b = LocalStore(tmp_path / "b", RING, BS)
    try:
        meta = Metadata(b)
        meta.holders.learn([ref])
        with b.db.write() as txn:
            meta.index.adopt(txn, ref)
        meta.restorer.adopt_root((await meta.index.load(ref.block_id)).commit)
        reads = SlowReads(b)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(meta.restorer.prefetch)
            started = trio.current_time()
            seen = await walk(b, meta)
            took = trio.current_time() - started
            nursery.cancel_scope.cancel()
        assert seen == expected, "the walk lists exactly the committed tree"
        dirs = 1 + TOP + TOP * BELOW
        assert reads.most > 4, f"directories fetched one at a time (at most {reads.most})"
        sequential = dirs * FETCH_DELAY
        assert took < sequential / 2, (
            f"walking {dirs} directories took {took:.2f} s; one at a time is {sequential:.2f} s"
        )
        assert meta.restorer.pending() == []
    finally:
        b.close()


async def test_a_directory_that_fails_to_come_ahead_is_loaded_by_the_walk(
    tmp_path: Path,
) -> None:
    ref, expected = await committed_tree(tmp_path)
    shutil.copytree(tmp_path / "a" / "shards", tmp_path / "b" / "shards")
    b = LocalStore(tmp_path / "b", RING, BS)
    try:
        meta = Metadata(b)
        meta.holders.learn([ref])
        with b.db.write() as txn:
            meta.index.adopt(txn, ref)
        meta.restorer.adopt_root((await meta.index.load(ref.block_id)).commit)
        await meta.restorer.ensure(ROOT_INO)
        last = b.tree.lookup(ROOT_INO, f"t{TOP - 1}".encode())
        failing = meta.restorer.lazy_top(last)
        reads = SlowReads(b)
        failed = []

        async def first_read_fails(block_id, *args, **kw):
            if block_id == failing and not failed:
                failed.append(block_id)
                raise BlockUnavailable("holders unreachable (this once)")
            return await reads.read(block_id, *args, **kw)

        b.blocks.read_parsed = first_read_fails
        async with trio.open_nursery() as nursery:
            nursery.start_soon(meta.restorer.prefetch)
            await until(lambda: failed, what="the prefetcher to try the last directory")
            seen = await walk(b, meta)
            nursery.cancel_scope.cancel()
        assert seen == expected, "the walk loaded the directory the prefetcher could not"
        assert meta.restorer.prefetched_dirs >= BELOW, "the prefetcher went on after the failure"
    finally:
        b.close()


class Steps(trio.abc.Instrument):
    """Counts the scheduler's passes (one I/O wait each)."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def flat_tree(tmp_path: Path, count: int) -> tuple[LocalStore, Metadata]:
    """Machine b, adopting machine a's commit of *count* directories of one file each
    in the root (nothing loaded yet). The caller closes the store."""
    a = LocalStore(tmp_path / "a", RING, BS)
    try:
        for i in range(count):
            await a.create(a.mkdir(ROOT_INO, f"d{i:02d}"), "f", b"x")
        ref = (await Metadata(a).commit()).ref
    finally:
        a.close()
    shutil.copytree(tmp_path / "a" / "shards", tmp_path / "b" / "shards")
    b = LocalStore(tmp_path / "b", RING, BS)
    meta = Metadata(b)
    meta.holders.learn([ref])
    with b.db.write() as txn:
        meta.index.adopt(txn, ref)
    meta.restorer.adopt_root((await meta.index.load(ref.block_id)).commit)
    return b, meta


def steps_of_reads(b: LocalStore, steps: Steps, stagger: float = 0.0) -> list[int]:
    """The scheduler pass in which each block read of *b* starts, in order; with
    *stagger*, the reads take 0 to 3 times that long (holders answer at their pace)."""
    started: list[int] = []
    real = b.blocks.read_parsed

    async def read(*args, **kw):
        started.append(steps.count)
        await trio.sleep(stagger * (len(started) % 4))
        return await real(*args, **kw)

    b.blocks.read_parsed = read
    return started


async def test_directories_fetched_ahead_start_together(tmp_path: Path) -> None:
    """The prefetcher starts the directories it takes in one scheduler step, so their
    node reads ask for shards in the same step: each peer's queue then holds all of
    them when its sender runs, and they go in one ``RetrieveShards`` call per peer
    (blocks/shardbatch.py) instead of a call per directory.

    Fails on the prefetcher that took a slot of its semaphore before starting each
    directory: every start was a step of its own (16 starts in 16 steps), and at 12
    peers a fresh machine's find made 7.2 calls a directory (2.8 shards each)."""
    count = PREFETCH_WAVE + 4
    b, meta = await flat_tree(tmp_path, count)
    try:
        await meta.restorer.ensure(ROOT_INO)  # queues every directory of the root
        steps = Steps()
        started = steps_of_reads(b, steps)
        trio.lowlevel.add_instrument(steps)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(meta.restorer.prefetch)
                await until(lambda: not meta.restorer.pending(), what="every directory")
                nursery.cancel_scope.cancel()
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert len(started) == count
        assert len(set(started)) == 1, f"{count} directories started in steps {started}"
    finally:
        b.close()


async def test_the_background_loader_starts_directories_in_waves(tmp_path: Path) -> None:
    """``load_all`` (no walk) starts BACKGROUND_LOADERS directories in one step and the
    next ones together once those are done, for the same reason as the prefetcher.

    Fails on the loader that started each directory as a slot of its limiter freed:
    past the first ones, each started in the step its predecessor ended."""
    count = BACKGROUND_LOADERS + 4
    b, meta = await flat_tree(tmp_path, count)
    try:
        await meta.restorer.ensure(ROOT_INO)
        steps = Steps()
        started = steps_of_reads(b, steps, stagger=0.02)
        trio.lowlevel.add_instrument(steps)
        try:
            await meta.restorer.load_all()
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert meta.restorer.pending() == []
        assert len(started) == count
        waves = [started[:BACKGROUND_LOADERS], started[BACKGROUND_LOADERS:]]
        assert [len(set(wave)) for wave in waves] == [1, 1], f"started in steps {started}"
    finally:
        b.close()


SMALL_FILES = 1000  # bench_e2e.py's small files: 4 KiB each, kept inline in the leaves
TOGETHER = 48  # nodes of one level in flight at once, at least


async def test_a_directory_of_many_leaves_fetches_them_together(tmp_path: Path) -> None:
    """A directory of 1,000 inline 4 KiB files is ~140 metadata nodes (leaves under index
    nodes); loading it on a fresh machine fetches each level's nodes together, not one
    index node's children (8 at a time) after another: its shard reads to each peer then
    share RetrieveShards calls. Failed before: at most 21 reads in flight, ~40 round
    trips."""
    a = LocalStore(tmp_path / "a", RING, BS)
    try:
        small = a.mkdir(ROOT_INO, "small")
        contents = {f"f{i:05d}": os.urandom(4096) for i in range(SMALL_FILES)}
        for name, data in contents.items():
            await a.create(small, name, data)
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
        ino = b.tree.lookup(ROOT_INO, b"small")
        reads = SlowReads(b)
        await meta.restorer.ensure(ino)
        assert reads.count > 100, f"the directory is {reads.count} nodes: too few to tell"
        assert reads.most >= TOGETHER, (
            f"at most {reads.most} of the directory's {reads.count} nodes were fetched at once"
        )
        names = sorted(name for _, name, _ in b.tree.entries(ino))
        assert names == [name.encode() for name in contents]
        for name in ("f00000", f"f{SMALL_FILES // 2:05d}", f"f{SMALL_FILES - 1:05d}"):
            assert await b.read(b.tree.lookup(ino, name.encode())) == contents[name]
    finally:
        b.close()
