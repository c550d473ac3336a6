"""A commit of a tree that keeps changing (fs/treecopy.py): it holds no read transaction
of meta.lmdb across its run, so the file stays near its live tables, and what it
commits is one moment of the tree, restored whole on a fresh machine.

Machine a creates files without pause while a full commit runs; machine b starts from
a copy of a's shard store, adopts the commit and restores it. Real LMDB, real block
store, no network."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import trio
from inproc import LocalStore, Metadata
from test_restore import adopt, names

from fluidfs import keys
from fluidfs.fs import treecopy
from fluidfs.fs.snapshots import Retention
from fluidfs.fs.tree import ROOT_INO

BS = 16 * 1024
RING = keys.KeyRing(keys.generate())
DIRS = 120
FILES = 4
BUSY = 7  # directories the new files go to


def content(name: str) -> bytes:
    return name.encode() * 20


async def test_files_created_during_a_full_commit_neither_grow_the_file_nor_tear_it(
    tmp_path: Path,
) -> None:
    a = LocalStore(tmp_path / "a", RING, BS)
    meta = Metadata(a)
    dirs = [a.mkdir(ROOT_INO, f"d{d:03}") for d in range(DIRS)]
    for d in dirs:
        for f in range(FILES):
            await a.create(d, f"f{f}", content(f"f{f}"))
    await a.data.seal_all()
    created = 0
    done = trio.Event()

    async def keep_creating() -> None:
        nonlocal created
        while not done.is_set():
            name = f"new{created:06}"
            await a.create(dirs[created % BUSY], name, content(name))
            created += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_creating)
        await trio.sleep(0)
        result = await meta.committer.commit(
            min_seq=0, snapshots=meta.snapshots, retention=Retention(), user_changed=True,
            prune=True, full=True,
        )
        done.set()
    assert result is not None and result.stats.full
    assert created > 200, f"only {created} files were created during the commit"
    used = a.db.usage()
    # 3x the live tables, plus 4 MiB of slack: at half a megabyte of tables LMDB's page
    # reuse leaves a few spare megabytes on a loaded machine (4.7x seen under load); one
    # reader held for the whole commit grew this file to 33.6 MB (65x).
    assert used.file_bytes <= 3 * used.live_bytes + 4 * 2**20, used
    assert not (tmp_path / "a" / "commit-copy.lmdb").exists(), "the scratch copy is gone"
    a.close()

    shutil.copytree(tmp_path / "a" / "shards", tmp_path / "b" / "shards")
    b = LocalStore(tmp_path / "b", RING, BS)
    try:
        restored = Metadata(b)
        await adopt(restored, result.ref)
        await restored.restorer.load_all()
        assert names(b, ROOT_INO) == [f"d{d:03}".encode() for d in range(DIRS)]
        new: list[int] = []
        read: dict[bytes, bytes] = {}
        for d in dirs:
            listed = names(b, d)
            assert listed[:FILES] == [f"f{f}".encode() for f in range(FILES)]
            new += [int(n[3:]) for n in listed[FILES:]]
            for name in listed:
                read[name] = await b.read(b.tree.lookup(d, name))
        assert sorted(new) == list(range(len(new))), "one moment: the first k new files"
        assert 0 < len(new) < created
        # the newest may have been caught between its creation and its write, or before
        # its data was sealed into blocks (the commit has its size, not its data yet)
        in_flight = f"new{len(new) - 1:06}".encode()
        whole = content(in_flight.decode())
        assert read.pop(in_flight) in (b"", bytes(len(whole)), whole)
        assert all(data == content(name.decode()) for name, data in read.items())
    finally:
        b.close()


async def test_a_copy_in_tiny_batches_restores_big_files_and_moves_exactly(
    tmp_path: Path, monkeypatch
) -> None:
    """Batches of a few rows: directories and a big file's block map are read in many
    transactions while files are moved between directories; the commit is still one
    moment (every file exactly once) and the big file comes back whole."""
    monkeypatch.setattr(treecopy, "COPY_BATCH", 5)
    a = LocalStore(tmp_path / "a", RING, BS)
    meta = Metadata(a)
    left, right = a.mkdir(ROOT_INO, "left"), a.mkdir(ROOT_INO, "right")
    big = os.urandom(40 * BS + 5)
    await a.create(a.mkdir(left, "deep"), "big", big)
    for f in range(30):
        await a.create(left, f"f{f:02}", content(f"f{f:02}"))
    await a.data.seal_all()
    moved = 0
    apply = treecopy._Copier.apply

    def apply_then_move(copier, ops) -> None:
        """Each batch written into the scratch, the user moves one file left → right."""
        nonlocal moved
        apply(copier, ops)
        if moved < 30:
            name = f"f{moved:02}".encode()
            with a.db.write() as txn:
                child = a.tree.lookup(left, name)
                a.tree.unlink(txn, left, name)
                a.tree.link(txn, right, name, child)
            moved += 1

    monkeypatch.setattr(treecopy._Copier, "apply", apply_then_move)
    result = await meta.committer.commit(
        min_seq=0, snapshots=meta.snapshots, retention=Retention(), user_changed=True,
        prune=True, full=True,
    )
    assert moved == 30
    a.close()

    shutil.copytree(tmp_path / "a" / "shards", tmp_path / "b" / "shards")
    b = LocalStore(tmp_path / "b", RING, BS)
    try:
        restored = Metadata(b)
        await adopt(restored, result.ref)
        await restored.restorer.load_all()
        files = names(b, left)[:-1] + names(b, right)  # less "deep"
        assert names(b, left)[-1] == b"deep"
        assert sorted(files) == [f"f{f:02}".encode() for f in range(30)], "each once"
        deep = b.tree.lookup(left, b"deep")
        assert await b.read(b.tree.lookup(deep, b"big")) == big
    finally:
        b.close()
