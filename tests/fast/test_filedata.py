"""File contents (fs/filedata.py) over a real block store, no network: dirty blocks,
sealing, holes, inline data, shared blocks, truncation, and recovery after a crash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from inproc import LocalStore

from fluidfs import keys
from fluidfs.fs.filedata import MEMORY_BLOCK_MAX
from fluidfs.fs.tree import BLOCK_REF, INLINE, ROOT_INO

BS = 64 * 1024
RING = keys.KeyRing(keys.generate())


@pytest.fixture
def store(tmp_path: Path):
    made = LocalStore(tmp_path / "state", RING, BS)
    yield made
    made.close()


def block_ids(store: LocalStore, ino: int) -> list[bytes]:
    """The sealed blocks of a file, in order (asserting none is inline)."""
    values = [value for _, value in store.tree.blocks_of(ino)]
    assert all(v[:1] == BLOCK_REF for v in values), values
    return [v[1:] for v in values]


async def test_writes_read_back_before_and_after_sealing(store: LocalStore) -> None:
    data = os.urandom(3 * BS + BS // 2)
    ino = await store.create(ROOT_INO, "f")
    await store.write(ino, 0, data)
    assert store.data.has_dirty(ino) and store.data.pending_bytes() == len(data)
    assert await store.read(ino) == data, "read from the dirty blocks"
    inode = store.tree.get(ino)
    assert await store.data.read(inode, BS - 3, 6) == data[BS - 3 : BS + 3], "across an edge"
    await store.data.seal_all()
    assert not store.data.has_dirty(ino) and store.data.pending_bytes() == 0
    ids = block_ids(store, ino)
    assert len(ids) == 4 and all(store.refcount(b) == 1 for b in ids)
    assert await store.read(ino) == data, "read from the cache"
    for block_id in ids:  # the plaintext is gone: blocks are rebuilt from their shards
        assert store.cache.forget(block_id)
    assert await store.read(ino) == data


async def test_holes_and_short_blocks_read_as_zeros(store: LocalStore) -> None:
    ino = await store.create(ROOT_INO, "sparse")
    await store.write(ino, 2 * BS + 10, b"tail")
    await store.write(ino, 5, b"head")
    inode = store.tree.get(ino)
    inode.size = 3 * BS + 100  # grown by a truncate: the rest reads as zeros
    store.tree.save(inode)
    want = bytearray(3 * BS + 100)
    want[5:9], want[2 * BS + 10 : 2 * BS + 14] = b"head", b"tail"
    assert await store.read(ino) == want
    await store.data.seal_all()
    assert [i for i, _ in store.tree.blocks_of(ino)] == [0, 2], "the hole stores nothing"
    assert await store.read(ino) == want


async def test_a_small_file_is_kept_inline(store: LocalStore) -> None:
    ino = await store.create(ROOT_INO, "small", b"hello")
    assert store.tree.blocks_of(ino) == [(0, INLINE + b"hello")]
    assert store.blocks.count() == 0, "no block for it"
    assert await store.read(ino) == b"hello"


async def test_identical_blocks_are_stored_once_and_counted(store: LocalStore) -> None:
    data = os.urandom(2 * BS)
    one = await store.create(ROOT_INO, "one", data)
    two = await store.create(ROOT_INO, "two", data)
    ids = block_ids(store, one)
    assert ids == block_ids(store, two) and store.blocks.count() == 2
    assert [store.refcount(b) for b in ids] == [2, 2]
    await store.data.remove(one)
    assert [store.refcount(b) for b in ids] == [1, 1]
    assert await store.read(two) == data
    await store.data.remove(two)
    assert store.blocks.count() == 0
    assert not any(store.cache.path(b).exists() for b in ids), "cached plaintext deleted"


async def test_rewriting_part_of_a_sealed_block_keeps_the_rest(store: LocalStore) -> None:
    data = os.urandom(BS)
    ino = await store.create(ROOT_INO, "f", data)
    (old,) = block_ids(store, ino)
    await store.write(ino, 100, b"patch")
    want = data[:100] + b"patch" + data[105:]
    assert await store.read(ino) == want
    await store.data.seal_inode(ino)
    (new,) = block_ids(store, ino)
    assert new != old and store.refcount(old) == 0 and store.refcount(new) == 1
    assert await store.read(ino) == want


async def test_truncate_drops_whole_blocks_and_cuts_the_last(store: LocalStore) -> None:
    data = os.urandom(3 * BS)
    ino = await store.create(ROOT_INO, "f", data)
    ids = block_ids(store, ino)
    inode = store.tree.get(ino)
    await store.data.truncate(inode, BS + 10)
    inode.size = BS + 10
    store.tree.save(inode)
    assert store.refcount(ids[2]) == 0, "the third block is released"
    assert await store.read(ino) == data[: BS + 10]
    inode.size = 2 * BS  # growing again shows zeros, not the old bytes
    store.tree.save(inode)
    assert await store.read(ino) == data[: BS + 10] + bytes(BS - 10)


async def test_unsealed_data_survives_a_crash_and_is_sealed_at_the_next_mount(
    tmp_path: Path,
) -> None:
    big = 4 * MEMORY_BLOCK_MAX  # one block; dirty blocks this large live in files
    first = LocalStore(tmp_path / "state", RING, big)
    data = os.urandom(MEMORY_BLOCK_MAX + 1000)
    ino = await first.create(ROOT_INO, "f")
    await first.write(ino, 0, data)
    assert (tmp_path / "state" / "dirty" / f"{ino}.0").stat().st_size == len(data)
    for blk in first.data.dirty.values():  # kill -9: the process and its files go away
        os.close(blk.fd)
    first.close()

    again = LocalStore(tmp_path / "state", RING, big)
    try:
        assert await again.recover() == 1
        assert await again.read(ino) == data, "readable before it is sealed"
        await again.data.seal_all()
        assert len(block_ids(again, ino)) == 1
        assert await again.read(ino) == data
        assert os.listdir(tmp_path / "state" / "dirty") == []
    finally:
        again.close()


async def test_recovery_discards_what_it_cannot_trust(store: LocalStore) -> None:
    ino = await store.create(ROOT_INO, "f", os.urandom(BS))
    dirty = store.data.dirty_dir
    leftovers = {
        f"{ino}.0.part": "a copy cut short: the sealed block is still the truth",
        "999.0": "an inode that does not exist",
        f"{ino}.5": "past the end of the file",
    }
    for name in leftovers:
        (dirty / name).write_bytes(b"x" * 100)
    (dirty / "notes.txt").write_bytes(b"not ours")
    assert await store.data.recover() == 0
    assert sorted(os.listdir(dirty)) == ["notes.txt"]
    assert not store.data.has_dirty(ino)


class Killed(BaseException):
    """kill -9 here: nothing after this point runs or cleans up."""


def kill_at(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> None:
    """The process dies when it calls *obj.name* (the call does not happen)."""

    def die(*_args, **_kw):
        raise Killed(name)

    monkeypatch.setattr(obj, name, die)


@pytest.mark.parametrize("point", ["mapping", "caching"])
async def test_a_crash_between_storing_a_block_and_mapping_it_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """Sealing takes the block's reference, points the block map at it and moves the dirty
    file into the cache. A kill -9 at any point must leave either the old map entry and
    the dirty file (sealed again at the next mount) or the new entry; never a reference
    nobody holds (a block kept, with its shards, for good) and never the dirty data gone.
    The reference and the map entry once took two transactions with the dirty file moved
    between them: a kill there lost the data and leaked the block."""
    big = 4 * MEMORY_BLOCK_MAX
    first = LocalStore(tmp_path / "state", RING, big)
    data = os.urandom(MEMORY_BLOCK_MAX + 1000)
    ino = await first.create(ROOT_INO, "f")
    await first.write(ino, 0, data)
    if point == "mapping":  # as the block map entry is written
        kill_at(monkeypatch, first.tree, "set_block")
    else:  # as the dirty file moves into the cache
        kill_at(monkeypatch, first.cache, "adopt_io")
    with pytest.raises(Killed):
        await first.data.seal_all()
    for blk in first.data.dirty.values():  # the process and its files go away
        if blk.fd is not None:
            os.close(blk.fd)
    first.close()

    again = LocalStore(tmp_path / "state", RING, big)
    try:
        await again.recover()
        await again.data.seal_all()
        assert await again.read(ino) == data, "the written data survives the crash"
        (block_id,) = block_ids(again, ino)
        assert again.refcount(block_id) == 1 and again.blocks.count() == 1
        assert os.listdir(again.data.dirty_dir) == []
        shard_ids = set(again.blocks.load(block_id).record.shard_ids)
        await again.data.remove(ino)
        assert again.blocks.count() == 0, (
            "a block nothing references is kept (and its shards stay on peers) for good"
        )
        assert not shard_ids & set(again.shards.ids(RING.public_key)), "its shards are gone"
    finally:
        again.close()


async def test_a_block_mapped_but_not_cached_is_sealed_again_without_a_second_reference(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When moving the dirty file into the cache fails (a full disk), the block is already
    stored and mapped: the dirty block stays and its next seal finds the same block."""
    store.data.block_size = 4 * MEMORY_BLOCK_MAX
    data = os.urandom(MEMORY_BLOCK_MAX + 1000)
    ino = await store.create(ROOT_INO, "f")
    await store.write(ino, 0, data)
    (blk,) = store.data.dirty.values()

    def full(*_args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(store.cache, "adopt_io", full)
        with pytest.raises(OSError):
            await store.data.seal(blk)
    assert store.data.has_dirty(ino), "the dirty block is kept"
    await store.data.seal(blk)
    (block_id,) = block_ids(store, ino)
    assert store.refcount(block_id) == 1, "one map entry, one reference"
    assert block_id in store.cache and os.listdir(store.data.dirty_dir) == []
    assert await store.read(ino) == data


async def test_sealing_a_dirty_file_hops_to_a_worker_thread_once_before_caching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a dirty file back, hashing it, looking its id up and sealing it run in one
    worker thread, not one hop each (issue 16: each hop cost the event loop more than
    some of the steps); the file then moves into the cache (a second hop)."""
    big = 4 * MEMORY_BLOCK_MAX  # a dirty block this large lives in a file
    store = LocalStore(tmp_path / "state", RING, big)
    try:
        data = os.urandom(big)
        ino = await store.create(ROOT_INO, "f")
        await store.write(ino, 0, data)
        assert (tmp_path / "state" / "dirty" / f"{ino}.0").exists()
        hops: list[str] = []
        run_sync = trio.to_thread.run_sync

        async def counted(fn, *args, **kwargs):
            hops.append(getattr(fn, "__name__", repr(fn)))
            return await run_sync(fn, *args, **kwargs)

        monkeypatch.setattr(trio.to_thread, "run_sync", counted)
        await store.data.seal_inode(ino)
        monkeypatch.undo()
        assert len(hops) <= 2, hops
        assert await store.read(ino) == data
        again = await store.create(ROOT_INO, "g")  # same bytes: a dedup, in one hop too
        await store.write(again, 0, data)
        monkeypatch.setattr(trio.to_thread, "run_sync", counted)
        hops.clear()
        await store.data.seal_inode(again)
        monkeypatch.undo()
        assert len(hops) <= 2, hops
        assert block_ids(store, again) == block_ids(store, ino)
        assert store.refcount(block_ids(store, ino)[0]) == 2
    finally:
        store.close()


async def test_a_read_of_a_rebuilt_block_is_served_from_it_without_a_copy(
    store: LocalStore,
) -> None:
    """A block rebuilt from its shards is held in memory; a read within it gets a view
    of those bytes (pyfuse3 hands any buffer to the kernel), not a copy of them."""
    data = os.urandom(2 * BS)
    ino = await store.create(ROOT_INO, "f")
    await store.write(ino, 0, data)
    await store.data.seal_all()
    first, _second = block_ids(store, ino)
    assert store.cache.forget(first)  # only its shards are left: the read rebuilds it
    inode = store.tree.get(ino)
    got = await store.data.read(inode, 100, 1000)
    assert got == data[100:1100]
    assert isinstance(got, memoryview) and got.obj is store.blocks.recent.get(first)
    got = await store.data.read(inode, BS - 10, 20)  # across two blocks: joined
    assert got == data[BS - 10 : BS + 10]
    inode.size = 2 * BS + 50  # grown by a truncate past the data: zeros after it
    assert await store.data.read(inode, 2 * BS - 10, 60) == data[-10:] + bytes(50)


async def test_a_small_file_whose_inline_write_fails_stays_dirty(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An LMDB write that fails (a full disk, say) must not take the bytes with it: the
    # dirty block goes only once its inline entry is written.
    ino = await store.create(ROOT_INO, "small")
    await store.write(ino, 0, b"keep me")
    real = store.tree.set_block

    def failing(txn, *args):
        raise OSError("no space left")

    monkeypatch.setattr(store.tree, "set_block", failing)
    with pytest.raises(OSError):
        await store.data.seal_all()
    assert store.data.has_dirty(ino)
    assert await store.read(ino) == b"keep me"
    monkeypatch.setattr(store.tree, "set_block", real)
    await store.data.seal_all()
    assert not store.data.has_dirty(ino)
    assert [v for _, v in store.tree.blocks_of(ino)] == [INLINE + b"keep me"]


async def test_a_sequential_read_looks_the_read_ahead_up_once_a_block(
    store: LocalStore,
) -> None:
    """A reader streaming through a file makes several reads per block (FUSE asks 1 MiB
    of a 4 MiB block at a time): the block map is looked up for the read-ahead once a
    block, in one transaction, not twice a read (issue 16: three transactions a read,
    two of them the read-ahead's). Failed on the code that looked it up on every read."""
    blocks, per_block = 8, 4
    data = os.urandom(blocks * BS)
    ino = await store.create(ROOT_INO, "f")
    await store.write(ino, 0, data)
    await store.data.seal_all()
    ids = block_ids(store, ino)
    inode = store.tree.get(ino)
    views = 0
    real_view = store.db.view

    def counted_view():
        nonlocal views
        views += 1
        return real_view()

    asked: list[bytes] = []
    real_prefetch = store.blocks.prefetch

    def noted(block_id: bytes) -> None:
        asked.append(bytes(block_id))
        real_prefetch(block_id)

    store.db.view = counted_view  # type: ignore[method-assign]
    store.blocks.prefetch = noted  # type: ignore[method-assign]
    step = BS // per_block
    got = [await store.data.read(inode, pos, step) for pos in range(0, len(data), step)]
    assert b"".join(bytes(part) for part in got) == data
    reads = blocks * per_block
    assert views <= reads + blocks, f"{views} transactions for {reads} reads"
    assert set(asked) == set(ids[1:]), "every later block is still fetched ahead"
    # a write drops the ids kept for the file: the next read looks them up again
    await store.write(ino, 0, b"x")
    views = 0
    await store.data.read(inode, BS, step)
    assert views == 2
