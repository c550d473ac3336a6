"""How the FUSE operations fail: internal errors reach the caller as EIO (never as an
errno that means something else to POSIX), and a metadata transaction that fails leaves
the inodes as they were, so a retry starts from what is stored."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import lmdb
import pyfuse3
import pytest
import trio
from inproc import LocalStore

from fluidfs import keys
from fluidfs.fs.operations import FluidOperations
from fluidfs.fs.tree import ROOT_INO

CTX = pyfuse3.RequestContext()
BS = 1024 * 1024  # a dirty block spills to a file past 256 KiB


@pytest.fixture
async def ops(tmp_path) -> Iterator[FluidOperations]:
    store = LocalStore(tmp_path / "state", keys.KeyRing(keys.generate()), BS)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.data.run)
        yield FluidOperations(store.tree, store.data, str(tmp_path))
        nursery.cancel_scope.cancel()
    store.close()


async def expect_errno(code: int, coro) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    assert info.value.errno == code, os.strerror(info.value.errno)


def mode_only(mode: int) -> SimpleNamespace:
    """setattr's attributes carrying *mode*, and ``fields`` saying only the mode changes."""
    names = ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")
    fields = SimpleNamespace(**{f"update_{n}": n == "mode" for n in names})
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = mode
    return attr, fields


async def test_internal_failure_on_write_is_eio_not_enoent(ops) -> None:
    fi, _ = await ops.create(ROOT_INO, b"f", 0o644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"x" * 200_000)  # a dirty block, still in memory
    shutil.rmtree(ops.data.dirty_dir)  # the dirty files' folder goes behind the node's back
    # The block outgrows memory and must move to a file, which cannot be created: that is
    # the node's trouble, not "no such file" for the writer.
    await expect_errno(errno.EIO, ops.write(fi.fh, 200_000, b"y" * 100_000))
    ops.data.dirty_dir.mkdir()
    assert await ops.write(fi.fh, 200_000, b"y" * 100_000) == 100_000
    assert await ops.read(fi.fh, 0, 300_000) == b"x" * 200_000 + b"y" * 100_000


async def test_deliberate_errnos_still_reach_the_caller(ops) -> None:
    await ops.create(ROOT_INO, b"f", 0o644, os.O_RDWR, CTX)
    await expect_errno(errno.EEXIST, ops.mkdir(ROOT_INO, b"f", 0o755, CTX))
    await expect_errno(errno.ENOENT, ops.unlink(ROOT_INO, b"nothing", CTX))
    await expect_errno(errno.ENAMETOOLONG, ops.mkdir(ROOT_INO, b"n" * 256, 0o755, CTX))
    await expect_errno(errno.EBADF, ops.write(999, 0, b"x"))
    await expect_errno(pyfuse3.ENOATTR, ops.getxattr(ROOT_INO, b"user.none", CTX))


@contextmanager
def metadata_full(ops: FluidOperations) -> Iterator[None]:
    """Make every metadata write transaction fail with a real ``MDB_MAP_FULL``.

    The map is shrunk to the pages in use, a reader pins every page freed from then
    on, and filler is written until LMDB has no page left to give.
    """
    ops.tree.db.commit_batch()  # the requests' write-behind batch holds the writer lock
    env = ops.tree.db.env
    size = env.info()["map_size"]
    env.set_mapsize(1)  # LMDB rounds it up to the pages in use
    filler = env.open_db(b"test-filler")
    reader = env.begin()
    try:
        for i in range(100_000):
            try:
                with env.begin(write=True) as txn:
                    txn.put(i.to_bytes(8, "big"), bytes(1000), db=filler)
            except lmdb.MapFullError:
                break
        yield
    finally:
        ops.tree.db.commit_batch()
        reader.abort()
        env.set_mapsize(size)
        with env.begin(write=True) as txn:
            txn.drop(filler)


async def test_failed_metadata_transaction_leaves_inodes_unchanged(ops) -> None:
    fi, attr = await ops.create(ROOT_INO, b"f", 0o644, os.O_RDWR, CTX)
    await ops.release(fi.fh)
    ino = attr.st_ino
    root_before = await ops.getattr(ROOT_INO)
    with metadata_full(ops):
        await expect_errno(errno.EIO, ops.setattr(ino, *mode_only(0o600), None, CTX))
        await expect_errno(errno.EIO, ops.unlink(ROOT_INO, b"f", CTX))
        await expect_errno(errno.EIO, ops.mkdir(ROOT_INO, b"d", 0o755, CTX))
        now = await ops.getattr(ino)
        assert (stat.S_IMODE(now.st_mode), now.st_nlink) == (0o644, 1)
        root = await ops.getattr(ROOT_INO)
        assert (root.st_nlink, root.st_mtime_ns) == (root_before.st_nlink, root_before.st_mtime_ns)
        assert (await ops.lookup(ROOT_INO, b"f", CTX)).st_ino == ino
    # The same calls once there is room again: they start from the stored state.
    assert stat.S_IMODE((await ops.setattr(ino, *mode_only(0o600), None, CTX)).st_mode) == 0o600
    await ops.unlink(ROOT_INO, b"f", CTX)
    assert (await ops.getattr(ino)).st_nlink == 0
    await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)
    assert (await ops.getattr(ROOT_INO)).st_nlink == root_before.st_nlink + 1
