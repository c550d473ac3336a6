"""Everyday tools on a real tree: rsync, cp -a, mv, rm -r, diff -r, find, tar, sqlite3."""

from __future__ import annotations

import os
import sqlite3
import sysconfig
from pathlib import Path

import pytest
from mounthelpers import own_xattrs, sh, snapshot

pytestmark = pytest.mark.mount

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Left out of the copies: bytecode, installed packages, and the build configuration
# (config-3.11-x86_64-linux-gnu/ holds libpython's 45 MB static library: half the tree's
# bytes, one file; the 1 GiB test is where size matters).
EXCLUDES = ["__pycache__", "site-packages", "config-3*"]


def _rsync_excludes() -> list[str]:
    return [f"--exclude={name}" for name in EXCLUDES]


def _diff_excludes() -> list[str]:
    return [arg for name in EXCLUDES for arg in ("-x", name)]


def _count(root: Path) -> int:
    """Entries under *root* (the tree as find sees it)."""
    out = sh("find", root, "-mindepth", "1", "-printf", "x").stdout
    return len(out)


def _source_count() -> int:
    args = ["find", STDLIB, "-mindepth", "1"]
    for name in EXCLUDES:
        args += ["-name", name, "-prune", "-o"]
    out = sh(*args, "-printf", "x").stdout
    return len(out)


def test_rsync_stdlib_tree_then_remount(mounted) -> None:
    target = mounted.path / "stdlib"
    sh("rsync", "-a", *_rsync_excludes(), f"{STDLIB}/", f"{target}/")
    n = _source_count()
    assert n > 2000, f"the stdlib tree is too small for this test ({n} entries)"
    assert _count(target) == n
    sh("diff", "-r", "--no-dereference", *_diff_excludes(), STDLIB, target)
    # a second rsync finds nothing to do: sizes, mtimes, modes, owners, links all kept
    again = sh("rsync", "-a", "-i", "-n", *_rsync_excludes(), f"{STDLIB}/", f"{target}/")
    assert again.stdout == "", again.stdout[:2000]
    before = snapshot(target)

    mounted.unmount()
    mounted.mount()
    sh("diff", "-r", "--no-dereference", *_diff_excludes(), STDLIB, target)
    again = sh("rsync", "-a", "-i", "-n", *_rsync_excludes(), f"{STDLIB}/", f"{target}/")
    assert again.stdout == "", again.stdout[:2000]
    after = snapshot(target)
    assert after == before


def test_rsync_with_xattrs_into_the_mount(mounted, tmp_path: Path) -> None:
    """The usual backup command with extended attributes: `rsync -aX` succeeds, again
    and again, and the user's attributes arrive."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"small")
    (src / "sub/b").write_bytes(os.urandom(600_000))
    os.setxattr(src / "a", "user.tag", b"one")
    os.setxattr(src / "sub/b", "user.tag", b"two")
    for run in range(3):
        result = sh("rsync", "-aX", f"{src}/", f"{mounted.path}/", check=False)
        assert result.returncode == 0, f"run {run}: {result.stderr[-2000:]}"
        (src / "a").write_bytes(b"changed" * (run + 2))  # a new size: rsync sees it
    assert own_xattrs(mounted.path / "a") == ["user.tag"]
    assert os.getxattr(mounted.path / "sub/b", "user.tag") == b"two"
    assert (mounted.path / "a").read_bytes() == b"changed" * 3


@pytest.fixture(scope="module")
def stdlib_copy(tmp_path_factory) -> Path:
    """A local copy of the stdlib tree without the excluded parts (a source for cp -a)."""
    copy = tmp_path_factory.mktemp("stdlib") / "lib"
    sh("rsync", "-a", *_rsync_excludes(), f"{STDLIB}/", f"{copy}/")
    return copy


def test_cp_mv_rm_on_a_real_tree(mounted, stdlib_copy: Path) -> None:
    root = mounted.path
    n = _source_count()
    os.mkdir(root / "work")
    sh("cp", "-a", stdlib_copy, root / "work/copy")
    assert _count(root / "work/copy") == n
    # (contents by hash, modes, owners, times, links, xattrs: what diff -r would see)
    assert snapshot(root / "work/copy", inodes=False) == snapshot(stdlib_copy, inodes=False)

    # mv a whole tree to another directory (a rename), then back under a new name
    os.mkdir(root / "elsewhere")
    sh("mv", root / "work/copy", root / "elsewhere/")
    assert os.listdir(root / "work") == []
    sh("mv", root / "elsewhere/copy", root / "work/renamed")
    sh("diff", "-r", "--no-dereference", *_diff_excludes(), STDLIB, root / "work/renamed")

    # cp -a inside the mount, then mv single files across directories
    sh("cp", "-a", root / "work/renamed", root / "work/second")
    sh("mv", root / "work/second/os.py", root / "work/second/json/os-moved.py")
    sh("cmp", STDLIB / "os.py", root / "work/second/json/os-moved.py")
    sh("mv", root / "work/second/json/os-moved.py", root / "work/second/os.py")
    sh("diff", "-r", "--no-dereference", *_diff_excludes(), STDLIB, root / "work/second")

    # rm -r one copy: the other is untouched
    sh("rm", "-r", root / "work/renamed")
    assert sorted(os.listdir(root / "work")) == ["second"]
    sh("diff", "-r", "--no-dereference", *_diff_excludes(), STDLIB, root / "work/second")
    sh("rm", "-rf", root / "work", root / "elsewhere")
    assert os.listdir(root) == []

    mounted.unmount()
    mounted.mount()
    assert os.listdir(root) == []


def test_tar_roundtrip_with_links(mounted, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(os.urandom(300_000))
    os.link(src / "a", src / "sub/hard")
    os.symlink("../a", src / "sub/soft")
    (src / "sub/x").write_text("x")
    os.chmod(src / "sub/x", 0o640)
    os.setxattr(src / "a", "user.note", b"keep me")
    archive = tmp_path / "t.tar"
    sh("tar", "--xattrs", "-cf", archive, "-C", src, ".")
    sh("tar", "--xattrs", "--xattrs-include=user.*", "-xpf", archive, "-C", mounted.path)
    assert os.stat(mounted.path / "a").st_ino == os.stat(mounted.path / "sub/hard").st_ino
    assert os.stat(mounted.path / "a").st_nlink == 2
    assert os.readlink(mounted.path / "sub/soft") == "../a"
    assert os.getxattr(mounted.path / "a", "user.note") == b"keep me"
    sh("diff", "-r", "--no-dereference", src, mounted.path)
    # and back out again
    out = tmp_path / "out"
    out.mkdir()
    sh("tar", "-cf", tmp_path / "back.tar", "-C", mounted.path, ".")
    sh("tar", "-xpf", tmp_path / "back.tar", "-C", out)
    sh("diff", "-r", "--no-dereference", src, out)


def test_sqlite_database(mounted) -> None:
    """A program that relies on locks, fsync and in-place page writes."""
    db = mounted.path / "app.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    with con:
        con.executemany("INSERT INTO t VALUES (?, ?)", ((i, os.urandom(100)) for i in range(5000)))
    with con:
        con.execute("DELETE FROM t WHERE k % 3 = 0")
        con.execute("UPDATE t SET v = x'00' WHERE k % 7 = 0")
    rows = con.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    con.close()
    check = sh("sqlite3", db, "PRAGMA integrity_check;")
    assert check.stdout.strip() == "ok"
    mounted.unmount()
    mounted.mount()
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == rows
    finally:
        con.close()
