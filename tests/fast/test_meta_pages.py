"""meta.lmdb's mapped pages are given back after the work that maps much of it
(store/db.py ``Database.release_pages``): a commit, the sync reply's and status's scans.

LMDB reads through a shared file mapping, so every page a commit reads stays resident
in the mount's RSS although it is clean page cache; at 1,000,000 files that was most of
the mount's 716 MiB VmRSS right after a sync.
"""

from __future__ import annotations

from pathlib import Path

from test_commit import Machine

from fluidfs.fs.tree import ROOT_INO
from fluidfs.store.db import Database

DIRS, FILES = 24, 100  # 2,400 files


def mapped_resident(path: Path) -> int:
    """Resident bytes of this process's mappings of *path* (/proc/self/smaps)."""
    total = 0
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1]) * 1024
    return total


async def test_a_commit_leaves_few_metadata_pages_mapped(tmp_path) -> None:
    """Failed before: ~1.3 MB of meta.lmdb stayed resident after this commit."""
    async with Machine(tmp_path / "a") as a:
        for d in range(DIRS):
            parent = await a.mkdir(ROOT_INO, f"d{d}")
            for f in range(FILES):
                await a.write(parent, f"f{f}", b"x" * 200)
        a.node.commits.note_change()
        result = await a.node.commits.commit(user_changed=True)
        assert result is not None and result.stats.files >= DIRS * FILES
        data = Path(a.node.meta.path) / "data.mdb"
        assert data.stat().st_size > 1 << 20, "the file is well past the bound"
        resident = mapped_resident(data)
        assert resident <= 256 << 10, resident


def test_release_pages_gives_back_what_a_read_mapped_and_nothing_after_close(tmp_path) -> None:
    db = Database(tmp_path / "m", ["t"])
    with db.write() as txn:
        for i in range(2000):
            txn.put(i.to_bytes(4, "big"), bytes(1000), db=db["t"])
    db.release_pages()
    with db.read() as txn:
        assert sum(len(v) for _, v in txn.cursor(db=db["t"])) == 2000 * 1000
    data = tmp_path / "m" / "data.mdb"
    assert mapped_resident(data) > 1 << 20, "the read mapped the pages"
    assert db.release_pages() > 0
    assert mapped_resident(data) < 64 << 10
    db.close()
    assert db.release_pages() == 0
