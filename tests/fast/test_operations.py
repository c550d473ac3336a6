"""The Operations object called directly (no kernel): POSIX rules and data path."""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
import trio.testing

from fluidfs import keys
from fluidfs.fs.health import XATTR_REDUNDANCY
from fluidfs.fs.operations import TIMEOUT, is_absent
from fluidfs.fs.tree import ROOT_INO
from fluidfs.node.node import Node, NodeConfig
from fluidfs.statedir import StateDir

CTX = pyfuse3.RequestContext()
BS = 64 * 1024


def fields(**kw):
    names = [
        "update_atime",
        "update_mtime",
        "update_ctime",
        "update_mode",
        "update_uid",
        "update_gid",
        "update_size",
    ]
    return SimpleNamespace(**{n: kw.get(n, False) for n in names})


@pytest.fixture
async def node(tmp_path):
    ring = keys.KeyRing(keys.generate())
    n = Node(NodeConfig(ring, StateDir(tmp_path / "state"), cache_size=1 << 20, block_size=BS))
    await n.start()
    async with trio.open_nursery() as nursery:
        await nursery.start(n.data.run)
        yield n
        nursery.cancel_scope.cancel()
    n.close()


async def expect_errno(code, coro):
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    assert info.value.errno == code


async def new_file(ops, name=b"f", parent=ROOT_INO):
    fi, attr = await ops.create(parent, name, 0o644, os.O_RDWR, CTX)
    return fi.fh, attr.st_ino


async def test_write_read_across_blocks_and_holes(node):
    ops = node.ops
    fh, ino = await new_file(ops)
    data = os.urandom(3 * BS + 123)
    assert await ops.write(fh, 10, data) == len(data)
    got = await ops.read(fh, 0, len(data) + 100)
    assert got == bytes(10) + data
    await ops.write(fh, 10 * BS, b"end")
    assert (await ops.getattr(ino)).st_size == 10 * BS + 3
    assert await ops.read(fh, 6 * BS, 16) == bytes(16)  # hole
    await ops.fsync(fh, False)  # seals everything
    assert not node.data.dirty
    assert await ops.read(fh, 0, len(data) + 10) == bytes(10) + data
    await ops.release(fh)


async def test_evicted_blocks_rebuild_from_shards(node):
    ops = node.ops
    fh, _ = await new_file(ops)
    data = os.urandom(40 * BS)  # 2.5 MiB through a 1 MiB cache
    await ops.write(fh, 0, data)
    await ops.fsync(fh, False)
    assert node.cache.used <= 1 << 20
    assert await ops.read(fh, 0, len(data)) == data
    await ops.release(fh)


async def test_truncate_down_mid_block_then_up_reads_zeros(node):
    ops = node.ops
    fh, ino = await new_file(ops)
    await ops.write(fh, 0, b"x" * (2 * BS))
    await ops.fsync(fh, False)
    await ops.setattr(ino, SimpleNamespace(st_size=BS + 5), fields(update_size=True), fh, CTX)
    await ops.setattr(ino, SimpleNamespace(st_size=2 * BS), fields(update_size=True), fh, CTX)
    got = await ops.read(fh, 0, 2 * BS)
    assert got == b"x" * (BS + 5) + bytes(BS - 5)
    await ops.fsync(fh, False)
    assert await ops.read(fh, 0, 2 * BS) == got


async def test_identical_blocks_are_stored_once(node):
    ops = node.ops
    block = os.urandom(BS)
    for name in (b"a", b"b"):
        fh, _ = await new_file(ops, name)
        await ops.write(fh, 0, block * 3)
        await ops.fsync(fh, False)
        await ops.release(fh)
    assert node.blocks.count() == 1
    stored = node.blocks.load(node.codec.block_id(block))
    assert stored.refcount == 6


async def test_unlinked_open_file_readable_until_released_then_space_freed(node):
    ops = node.ops
    fh, ino = await new_file(ops)
    await ops.write(fh, 0, os.urandom(2 * BS))
    await ops.fsync(fh, False)
    used = node.shards.used(node.config.keyring.public_key)
    assert used > 2 * BS
    await ops.unlink(ROOT_INO, b"f", CTX)
    assert is_absent(await ops.lookup(ROOT_INO, b"f", CTX))
    assert len(await ops.read(fh, 0, 2 * BS)) == 2 * BS
    await ops.release(fh)
    await ops.forget([(ino, 1)])
    assert node.tree.get(ino) is None
    assert node.shards.used(node.config.keyring.public_key) == 0
    assert node.blocks.count() == 0


async def test_directory_rules(node):
    ops = node.ops
    d = await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)
    await new_file(ops, b"x", d.st_ino)
    assert (await ops.getattr(ROOT_INO)).st_nlink == 3
    await expect_errno(errno.ENOTEMPTY, ops.rmdir(ROOT_INO, b"d", CTX))
    await expect_errno(errno.EEXIST, ops.mkdir(ROOT_INO, b"d", 0o755, CTX))
    await expect_errno(errno.ENAMETOOLONG, ops.mkdir(ROOT_INO, b"n" * 256, 0o755, CTX))
    await expect_errno(errno.EISDIR, ops.unlink(ROOT_INO, b"d", CTX))
    await expect_errno(errno.ENOTDIR, ops.rmdir(d.st_ino, b"x", CTX))
    await ops.unlink(d.st_ino, b"x", CTX)
    await ops.rmdir(ROOT_INO, b"d", CTX)
    assert (await ops.getattr(ROOT_INO)).st_nlink == 2


async def test_rename_replace_noreplace_exchange(node):
    ops = node.ops
    _, a = await new_file(ops, b"a")
    _, b = await new_file(ops, b"b")
    await expect_errno(
        errno.EEXIST, ops.rename(ROOT_INO, b"a", ROOT_INO, b"b", pyfuse3.RENAME_NOREPLACE, CTX)
    )
    await ops.rename(ROOT_INO, b"a", ROOT_INO, b"b", pyfuse3.RENAME_EXCHANGE, CTX)
    assert node.tree.lookup(ROOT_INO, b"a") == b and node.tree.lookup(ROOT_INO, b"b") == a
    await ops.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0, CTX)
    assert node.tree.lookup(ROOT_INO, b"a") is None
    assert node.tree.lookup(ROOT_INO, b"b") == b
    assert node.tree.get(a).nlink == 0
    d = await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)
    await expect_errno(errno.EISDIR, ops.rename(ROOT_INO, b"b", ROOT_INO, b"d", 0, CTX))
    await expect_errno(errno.ENOTDIR, ops.rename(ROOT_INO, b"d", ROOT_INO, b"b", 0, CTX))
    e = await ops.mkdir(d.st_ino, b"e", 0o755, CTX)
    await ops.rename(d.st_ino, b"e", ROOT_INO, b"e", 0, CTX)
    assert (await ops.getattr(d.st_ino)).st_nlink == 2
    assert (await ops.getattr(ROOT_INO)).st_nlink == 4
    assert node.tree.lookup(ROOT_INO, b"e") == e.st_ino


async def test_links_symlinks_attrs_and_xattrs(node):
    ops = node.ops
    _, ino = await new_file(ops, b"f")
    attr = await ops.link(ino, ROOT_INO, b"g", CTX)
    assert attr.st_nlink == 2
    s = await ops.symlink(ROOT_INO, b"s", b"f", CTX)
    assert stat.S_ISLNK(s.st_mode) and await ops.readlink(s.st_ino, CTX) == b"f"
    new = SimpleNamespace(st_mode=0o4700, st_uid=12, st_gid=34, st_mtime_ns=5, st_atime_ns=6)
    got = await ops.setattr(
        ino,
        new,
        fields(
            update_mode=True, update_uid=True, update_gid=True, update_mtime=True, update_atime=True
        ),
        None,
        CTX,
    )
    assert (stat.S_IMODE(got.st_mode), got.st_uid, got.st_gid) == (0o4700, 12, 34)
    assert stat.S_ISREG(got.st_mode) and got.st_mtime_ns == 5 and got.st_atime_ns == 6
    await ops.setxattr(ino, b"user.tag", b"v" * 1000, CTX)
    assert await ops.getxattr(ino, b"user.tag", CTX) == b"v" * 1000
    assert await ops.listxattr(ino, CTX) == [b"user.tag"]  # computed ones are not listed
    assert await ops.getxattr(ino, b"user.fluidfs.redundancy", CTX) == b"empty"
    await expect_errno(errno.ENOTSUP, ops.setxattr(ino, b"trusted.x", b"1", CTX))
    await expect_errno(pyfuse3.ENOATTR, ops.getxattr(ino, b"user.none", CTX))
    await ops.removexattr(ino, b"user.tag", CTX)
    await expect_errno(pyfuse3.ENOATTR, ops.removexattr(ino, b"user.tag", CTX))


async def test_unexpected_errors_become_eio_not_crashes(node):
    ops = node.ops
    fh, _ = await new_file(ops)

    async def broken(*_args):
        raise RuntimeError("disk on fire")

    node.data.read = broken
    await expect_errno(errno.EIO, ops.read(fh, 0, 10))
    await expect_errno(errno.EBADF, ops.read(9999, 0, 10))
    await expect_errno(errno.ENOENT, ops.getattr(424242))


async def test_o_trunc_open(node):
    ops = node.ops
    fh, ino = await new_file(ops)
    await ops.write(fh, 0, b"hello")
    await ops.release(fh)
    fi = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)
    assert (await ops.getattr(ino)).st_size == 0
    await ops.release(fi.fh)


async def test_files_advertise_one_mebibyte_io_so_copies_use_large_requests(node):
    """cp sizes its buffer by st_blksize: 1 MiB makes one FUSE request per MiB copied
    (libfuse 3 negotiates 1 MiB writes), not eight of 128 KiB (issue 16)."""
    _fh, ino = await new_file(node.ops)
    assert (await node.ops.getattr(ino)).st_blksize == 1 << 20


def tree_gen(node) -> int:
    with node.ops.tree.db.read() as txn:
        return node.ops.tree.generation(txn)


async def test_each_request_bumps_the_tree_generation_once(node):
    """A request's changes (a create writes the inode, the entry and the parent) share
    one generation: a small-file create costs one tree_gen bump per request that
    changes the tree, not one per row it writes."""
    ops = node.ops
    before = tree_gen(node)
    fh, ino = await new_file(ops)
    assert tree_gen(node) == before + 1
    await ops.write(fh, 0, b"x" * 200)
    assert tree_gen(node) == before + 2
    await ops.fsync(fh, False)  # seals: the block map entry is one more change
    assert tree_gen(node) == before + 3
    await ops.release(fh)
    assert (await ops.getattr(ino)).st_size == 200


async def test_a_write_to_a_block_nobody_holds_does_not_yield(node):
    """Writing a small file's block takes its lock at once: no scheduler round trip
    per request when nobody else holds it."""
    ops = node.ops
    fh, _ = await new_file(ops)
    with trio.testing.assert_no_checkpoints():
        await ops.write(fh, 0, b"x" * 200)
        await ops.write(fh, 200, b"y" * 200)
    fi = await ops.open((await ops.lookup(ROOT_INO, b"f", CTX)).st_ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 1000) == b"x" * 200 + b"y" * 200


async def test_a_small_file_is_sealed_when_closed(node):
    """Closing a small file seals it there and then (its bytes join the block map
    inline): nothing of it waits unsealed for a sealer task, and its redundancy is no
    longer "local" the moment close returns."""
    ops = node.ops
    fh, ino = await new_file(ops)
    await ops.write(fh, 0, b"s" * 200)
    assert await ops.getxattr(ino, XATTR_REDUNDANCY, CTX) == b"local"
    await ops.release(fh)
    assert not node.data.has_dirty(ino)
    assert await ops.getxattr(ino, XATTR_REDUNDANCY, CTX) != b"local"
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 1000) == b"s" * 200

async def test_inode_cache_stays_bounded_while_the_kernel_knows_every_file(node):
    # The kernel forgets nothing on a machine with free memory: a million files created
    # must not mean a million decoded inodes in the mount's memory.
    ops = node.ops
    node.tree.cache_max = 40
    made = {}
    for i in range(200):
        fh, ino = await new_file(ops, f"f{i}".encode())
        await ops.write(fh, 0, b"x" * i)
        await ops.release(fh)
        made[ino] = i
    assert len(node.tree._cache) <= 40
    for ino, size in made.items():  # every file still reads as written
        assert (await ops.getattr(ino)).st_size == size
    assert len(node.tree._cache) <= 40


async def test_status_counts_the_kernels_requests_by_operation(node):
    """`fluidfs status --json` reports the FUSE requests the mount answered, by
    operation, failed ones included: what a workload costs in round trips (issue 16)."""
    ops = node.ops
    before = node.status.figures(node.status.scan())["fuse_requests"]
    assert is_absent(await ops.lookup(ROOT_INO, b"f", CTX))
    fh, ino = await new_file(ops)
    await ops.write(fh, 0, b"x" * 4096)
    await ops.release(fh)
    await ops.getattr(ino, CTX)
    await ops.forget([(ino, 1)])
    after = node.status.figures(node.status.scan())["fuse_requests"]
    added = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
    assert added == {
        "lookup": 1, "create": 1, "write": 1, "release": 1, "getattr": 1, "forget": 1
    }


async def test_a_missing_name_is_a_negative_entry_the_kernel_may_keep(node):
    """A lookup of a name that is not there answers inode 0 with the entry timeout
    (pyfuse3's negative entry), not ENOENT, which the kernel does not keep: a second
    miss of the same name (a stat before a create) is then no request."""
    entry = await node.ops.lookup(ROOT_INO, b"missing", CTX)
    assert entry.st_ino == 0 and entry.entry_timeout == TIMEOUT
    assert not node.ops.lookups.get(0)
