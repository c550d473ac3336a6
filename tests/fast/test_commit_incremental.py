"""Commits that cost what changed (fs/dirstate.py, fs/commit.py, fs/treewalk.py).

A commit reads and writes only the directories changed since the last one and the path
above them; these tests pin that shape (count the directories and nodes a commit
touches) and that what it writes is the tree: the same top node a commit reading every
directory makes, and a restored machine sees the live tree.
"""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pyfuse3
from test_commit import CTX, Machine, restore_into

from fluidfs.fs.metaformat import LEAF, decode_node
from fluidfs.fs.tree import ROOT_INO

WIDE, DEEP, FILES = 8, 4, 4  # root / a0..a7 / b0..b3 / 4 files: 41 directories


async def populate(m: Machine) -> dict[str, int]:
    """The test tree; path → inode of each directory."""
    dirs = {"": ROOT_INO}
    for i in range(WIDE):
        a = dirs[f"a{i}"] = await m.mkdir(ROOT_INO, f"a{i}")
        for j in range(DEEP):
            b = dirs[f"a{i}/b{j}"] = await m.mkdir(a, f"b{j}")
            for k in range(FILES):
                await m.write(b, f"f{k}", f"{i}/{j}/{k}".encode() * (k + 1))
    return dirs


async def overwrite(m: Machine, path: str, data: bytes) -> None:
    """Write *data* over the start of an existing (shorter) file."""
    fi = await m.ops.open(await m.lookup(path), os.O_RDWR, CTX)
    await m.ops.write(fi.fh, 0, data)
    await m.ops.release(fi.fh)


async def commit(m: Machine, **kw):
    m.node.commits.note_change()
    return await m.node.commits.commit(user_changed=True, **kw)


async def listing(m: Machine, ino: int = ROOT_INO, path: str = "") -> dict:
    """path → (mode, size, nlink, xattr, contents) of everything under *ino*."""
    out = {}
    for name in await m.names(ino):
        child = (await m.ops.lookup(ino, name, CTX)).st_ino
        attr = await m.ops.getattr(child)
        sub = f"{path}/{name.decode()}"
        xattrs = sorted(await m.ops.listxattr(child, CTX))
        data = await m.read(sub[1:]) if stat.S_ISREG(attr.st_mode) else None
        out[sub] = (attr.st_mode, attr.st_size, attr.st_nlink, xattrs, data)
        if stat.S_ISDIR(attr.st_mode):
            out.update(await listing(m, child, sub))
    return out


def chmod(mode: int) -> tuple:
    names = ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")
    fields = SimpleNamespace(**{f"update_{n}": n == "mode" for n in names})
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = mode
    return attr, fields


async def test_a_one_file_change_writes_only_its_path(tmp_path) -> None:
    async with Machine(tmp_path / "a") as a:
        await populate(a)
        first = await commit(a)
        assert first.stats.dirs == 1 + WIDE + WIDE * DEEP, "every directory is new"
        await overwrite(a, "a3/b2/f1", b"changed-content")
        second = await commit(a)
        stats = second.stats
        depth = 3  # a3/b2, a3, the root
        assert not stats.full
        assert stats.dirs == depth, stats
        # per directory on the path its changed leaf and the index nodes above it (at
        # most two levels at this size), then the snapshot list's leaf and the commit
        # node: the nodes serialised, new or reused, are bounded by the depth, not the tree
        bound = 3 * depth + 2
        assert first.stats.nodes_written > bound, "the bound tells the path from the tree"
        assert stats.nodes_written + stats.nodes_reused <= bound, stats
        assert second.head.tree != first.head.tree
        # nothing changed: nothing read, nothing new
        assert await a.node.commits.commit(user_changed=False) is None
        assert a.node.committer.last.stats.dirs == depth

    b = await restore_into(tmp_path, "a", "b", second)
    try:
        assert await b.read("a3/b2/f1") == b"changed-content"
        assert await b.read("a3/b1/f1") == b"3/1/1" * 2
    finally:
        await b.__aexit__()


async def test_moves_renames_and_removals_across_directories_commit_the_tree(tmp_path) -> None:
    async with Machine(tmp_path / "a") as a:
        dirs = await populate(a)
        await commit(a)
        ops = a.ops
        # a file moves to another directory, a directory to another parent
        await ops.rename(dirs["a1/b1"], b"f0", dirs["a2"], b"moved-file", 0, CTX)
        await ops.rename(dirs["a3"], b"b3", dirs["a4/b0"], b"moved-dir", 0, CTX)
        # a file in the moved directory changes after the move
        await overwrite(a, "a4/b0/moved-dir/f2", b"after the move!!")
        # a directory emptied and removed; a new empty one; a new one with a file
        for k in range(FILES):
            await ops.unlink(dirs["a5/b1"], f"f{k}".encode(), CTX)
        await ops.rmdir(dirs["a5"], b"b1", CTX)
        await a.mkdir(dirs["a6/b2"], "empty")
        await a.write(await a.mkdir(dirs["a6"], "new"), "n", b"new file")
        # a hard link in a third directory, then the original's attributes change
        f = await a.lookup("a7/b0/f3")
        await ops.link(f, dirs["a0/b0"], b"link", CTX)
        await ops.setattr(f, *chmod(stat.S_IFREG | 0o600), None, CTX)
        # attributes of a deep directory and an xattr of a file
        await ops.setattr(dirs["a2/b3"], *chmod(stat.S_IFDIR | 0o700), None, CTX)
        await ops.setxattr(await a.lookup("a0/b1/f1"), b"user.tag", b"v", CTX)
        # a replaced file (rename over an existing name)
        await ops.rename(dirs["a2/b2"], b"f0", dirs["a2/b2"], b"f1", 0, CTX)
        incremental = await commit(a)
        assert not incremental.stats.full
        assert incremental.stats.dirs < 1 + WIDE + WIDE * DEEP, incremental.stats
        # reading every directory makes exactly the same tree
        full = await a.node.commits.commit(user_changed=False, force=True, full=True)
        assert full.stats.full and full.head.tree == incremental.head.tree
        live = await listing(a)
    assert "/a5/b1" not in live and "/a4/b0/moved-dir/f2" in live and "/a6/b2/empty" in live

    b = await restore_into(tmp_path, "a", "b", full)  # the same tree; its head is kept
    try:
        await b.node.restorer.load_all()
        assert await listing(b) == live
    finally:
        await b.__aexit__()


async def test_a_store_from_before_the_index_gets_one_full_commit(tmp_path) -> None:
    """A state written before the dirty-directory tables: they are built, the first
    commit reads everything, the next ones only what changed."""
    async with Machine(tmp_path / "a") as a:
        await populate(a)
        db = a.node.meta
        with db.write() as txn:  # what an older version left: no index, no marks
            for table in ("dir_parents", "dir_dirty", "dir_nodes", "dir_state"):
                txn.drop(db[table], delete=False)
        first = await commit(a)
        assert first.stats.full
        await overwrite(a, "a0/b0/f0", b"xyz")
        second = await commit(a)
        assert not second.stats.full and second.stats.dirs == 3
        full = await a.node.commits.commit(user_changed=False, force=True, full=True)
        assert full.head.tree == second.head.tree


WIDE_ROOT = 600  # subdirectories of the root: several leaves of it


async def leaves_of(m: Machine, top: bytes) -> list[tuple[bytes, int]]:
    """(first name, entries) of each leaf under the committed node *top*."""
    node = decode_node(await m.node.blocks.read(top, 0, 1 << 30))
    if node.type == LEAF:
        return [(node.entries[0].name, len(node.entries))]
    found = []
    for _, ref, _ in node.children:
        found += await leaves_of(m, ref.record.block_id)
    return found


async def test_a_change_under_a_wide_directory_encodes_one_leaf_of_it(
    tmp_path, monkeypatch
) -> None:
    """A directory of many entries on the path of a change (the root of a big tree has
    one per subdirectory) keeps its committed leaves but the one holding the changed
    entry: the entries encoded and the bytes hashed for it are one leaf's, and the nodes
    serialised are bounded by the depth. Failed before: the whole root was read,
    encoded and hashed again on every commit (every leaf ``nodes_reused``)."""
    from fluidfs.fs import commit as commit_module

    encoded: list[list[bytes]] = []  # names of each leaf encoded
    real_encode = commit_module.encode_leaf

    def counting_encode(entries):
        encoded.append([e.name for e in entries])
        return real_encode(entries)

    monkeypatch.setattr(commit_module, "encode_leaf", counting_encode)
    monkeypatch.setattr(commit_module, "KEEP_PIECE", 2)  # kept leaves named in pieces

    async with Machine(tmp_path / "a") as a:
        for i in range(WIDE_ROOT):
            await a.write(await a.mkdir(ROOT_INO, f"dir-{i:04d}"), "f", b"x%d" % i)
        first = await commit(a)
        leaves = await leaves_of(a, first.head.tree)
        assert len(leaves) >= 5, "the root is cut into several leaves"
        assert sum(count for _, count in leaves) == WIDE_ROOT
        small = min(range(len(leaves) - 1), key=lambda i: leaves[i][1])
        name, count = leaves[small][0].decode(), leaves[small][1]
        after = leaves[small + 1][1]
        hashed: list[int] = []
        real_id = a.node.blocks.codec.block_id

        def counting_id(plain: bytes) -> bytes:
            hashed.append(len(plain))
            return real_id(plain)

        monkeypatch.setattr(a.node.blocks.codec, "block_id", counting_id)

        def root_entries() -> int:
            return sum(1 for names in encoded for n in names if n.startswith(b"dir-"))

        # a file under one subdirectory: the root's entry for that subdirectory changes
        encoded.clear()
        await overwrite(a, f"{name}/f", b"changed!")
        second = await commit(a)
        stats = second.stats
        assert not stats.full and stats.dirs == 2, stats
        assert root_entries() == count, (root_entries(), leaves[small])
        assert stats.leaves_kept == len(leaves) - 1
        depth = 2  # the subdirectory and the root
        assert stats.nodes_written + stats.nodes_reused <= 3 * depth + 2, stats
        assert sum(hashed) < 32 * 1024 + count * 1024, sum(hashed)

        # a new entry in the root itself (a dirty name): its leaf again, and the next
        # one unless the new entry ends a leaf (the cuts after it move up to the next)
        encoded.clear()
        await a.write(ROOT_INO, f"{name}-new", b"new")
        third = await commit(a)
        assert count + 1 <= root_entries() <= count + 1 + after, root_entries()
        assert third.stats.leaves_kept >= len(leaves) - 2

        # a removed entry in another leaf and a renamed one
        other = (small + 1) % len(leaves)
        gone = leaves[other][0]
        await a.ops.rename(ROOT_INO, gone, ROOT_INO, gone + b"-renamed", 0, CTX)
        await a.ops.unlink(await a.lookup(f"{name}"), b"f", CTX)
        fourth = await commit(a)
        assert fourth.stats.leaves_kept >= len(leaves) - 4

        # reading every directory makes exactly the same tree
        full = await a.node.commits.commit(user_changed=False, force=True, full=True)
        assert full.stats.full and full.head.tree == fourth.head.tree
        live = await listing(a)

    b = await restore_into(tmp_path, "a", "b", full)
    try:
        await b.node.restorer.load_all()
        assert await listing(b) == live
    finally:
        await b.__aexit__()


async def test_after_a_fresh_machine_loads_the_tree_a_one_file_change_writes_only_its_path(
    tmp_path,
) -> None:
    """A restore writes each loaded directory's entries as its committed node holds them
    and remembers that node: the first commit after a fresh machine's full walk reads
    the changed path only. Failed before: loading marked every loaded directory (and
    each lazy subdirectory) dirty, so that commit read and wrote the whole tree."""
    async with Machine(tmp_path / "a") as a:
        await populate(a)
        await a.mkdir(await a.lookup("a6/b2"), "empty")
        first = await commit(a)
    b = await restore_into(tmp_path, "a", "b", first)
    try:
        await b.node.restorer.load_all()
        assert b.node.restorer.pending() == []
        await overwrite(b, "a3/b2/f1", b"changed-content")
        second = await commit(b)
        stats = second.stats
        assert not stats.full
        assert stats.dirs == 3, stats  # a3/b2, a3, the root
        assert stats.nodes_written + stats.nodes_reused <= 3 * 3 + 2, stats
        full = await b.node.commits.commit(user_changed=False, force=True, full=True)
        assert full.head.tree == second.head.tree, "reading every directory: the same tree"
        live = await listing(b)
    finally:
        await b.__aexit__()
    assert live["/a3/b2/f1"][-1] == b"changed-content" and "/a6/b2/empty" in live


async def test_a_hard_link_changed_while_its_other_directory_is_lazy_is_committed(
    tmp_path,
) -> None:
    """A file named in two directories changes through the loaded one while the other
    is still lazy: loading the other later finds the inode already there and marks its
    entry, so the commit does not name that directory's stale committed node."""
    async with Machine(tmp_path / "a") as a:
        dirs = await populate(a)
        await a.ops.link(await a.lookup("a7/b0/f3"), dirs["a0/b0"], b"link", CTX)
        first = await commit(a)
    b = await restore_into(tmp_path, "a", "b", first)
    try:
        f = await b.lookup("a0/b0/link")
        assert dirs["a7"] in b.node.restorer.pending(), "a7/b0 is not loaded yet"
        await b.ops.setattr(f, *chmod(stat.S_IFREG | 0o600), None, CTX)
        await b.node.restorer.load_all()
        second = await commit(b)
        assert not second.stats.full
        full = await b.node.commits.commit(user_changed=False, force=True, full=True)
        assert full.head.tree == second.head.tree, "reading every directory: the same tree"
    finally:
        await b.__aexit__()
