"""meta.lmdb stays near the size of its tables (store/compact.py, store/db.py)."""

from __future__ import annotations

import os

from test_commit import CTX, Machine

from fluidfs.fs.tree import ROOT_INO
from fluidfs.node import status as status_module
from fluidfs.store import compact

PER_COMMIT = 10


async def churn(m: Machine, commits: int) -> None:
    """*commits* commits, each after PER_COMMIT small files were created and as many removed."""
    dirs = [await m.mkdir(ROOT_INO, f"d{i}") for i in range(10)]
    made: list[tuple[int, bytes, int]] = []
    for n in range(commits):
        for i in range(PER_COMMIT):
            name = f"f{n}-{i}"
            ino = await m.write(dirs[i % 10], name, os.urandom(300))
            made.append((dirs[i % 10], name.encode(), ino))
        for parent, name, ino in made[:-PER_COMMIT]:
            await m.ops.unlink(parent, name, CTX)
            await m.ops.forget([(ino, 1)])
        del made[:-PER_COMMIT]
        m.node.commits.note_change()
        await m.node.commits.commit(user_changed=True)


async def test_after_50_commits_of_churn_the_metadata_file_stays_within_3x(tmp_path) -> None:
    state = tmp_path / "a"
    async with Machine(state) as a:
        await churn(a, 50)
        running = a.node.meta.usage()
        assert running.file_bytes <= 3 * running.live_bytes, running
        # fluidfs status --json says the same, and splits the process's memory
        status = await a.node.status.report()
        assert status["meta_store"]["file_bytes"] == running.file_bytes
        assert status["meta_store"]["compaction_due"] is False
        memory = status["memory"]
        assert 0 < memory["rss_anon"] < memory["vm_rss"] and memory["rss_file"] > 0
    again = Machine(state)
    try:
        after = again.node.meta.usage()
        assert after.file_bytes <= 3 * after.live_bytes, after
    finally:
        again.node.close()


async def test_a_file_grown_under_a_long_reader_is_compacted_at_unmount(
    tmp_path, monkeypatch
) -> None:
    """A read transaction held across commits (what commits used to do) keeps LMDB from
    reusing freed pages: the file grows far past its tables, and stays so until the
    store is compacted when the node closes."""
    monkeypatch.setattr(compact, "COMPACT_MIN_BYTES", 256 << 10)  # a small test tree
    state = tmp_path / "a"
    async with Machine(state) as a:
        stuck = a.node.meta.read()
        try:
            await churn(a, 50)
        finally:
            stuck.abort()
        grown = a.node.meta.usage()
        assert grown.due and grown.file_bytes > 3 * grown.live_bytes, grown
        tree_files = len(await a.names(await a.lookup("d3")))
    again = Machine(state)
    try:
        after = again.node.meta.usage()
        assert after.file_bytes <= 3 * after.live_bytes, after
        assert after.file_bytes < grown.file_bytes / 2
        assert not (state / "meta.lmdb" / "compact.tmp").exists()
        assert len(await again.names(await again.lookup("d3"))) == tree_files
        assert again.node.committer.heads.latest() is not None
    finally:
        again.node.close()


async def test_status_reads_a_big_table_in_short_transactions(tmp_path, monkeypatch) -> None:
    """`fluidfs status` counts every block record and inode: at a million files one read
    transaction across that scan would pin, for seconds at every status (the web page
    asks every 5 s), the pages commits free meanwhile. It reads SCAN_BATCH records per
    transaction instead (8 here, so a small tree has many batches) and counts the same.
    Fails on the old code: one transaction for the whole scan."""
    monkeypatch.setattr(status_module, "SCAN_BATCH", 8, raising=False)
    async with Machine(tmp_path / "a") as a:
        folder = await a.mkdir(ROOT_INO, "d")
        for i in range(40):
            await a.write(folder, f"f{i}", os.urandom(300 if i % 2 else 3000))
        a.node.commits.note_change()
        await a.node.commits.commit(user_changed=True)
        meta = a.node.meta
        opened = 0
        real_read = meta.read

        def counting_read():
            nonlocal opened
            opened += 1
            return real_read()

        monkeypatch.setattr(meta, "read", counting_read)
        scanned = a.node.status.scan()
        monkeypatch.setattr(meta, "read", real_read)
        with meta.read() as txn:
            inodes = txn.stat(meta["inodes"])["entries"]
            blocks = txn.stat(meta["blocks"])["entries"]
        assert scanned.files == 40
        assert opened >= (inodes + blocks) // 8, (opened, inodes, blocks)
