"""Computed (virtual) xattrs are readable by name but never listed, so copying tools
neither loop on them nor carry them to other filesystems (as Ceph does with ceph.*)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mounthelpers import sh, write_file

pytestmark = pytest.mark.mount

REDUNDANCY = "user.fluidfs.redundancy"


def _source(root: Path) -> Path:
    """A small tree with user xattrs, a hard link, a symlink and a subdirectory."""
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"alpha" * 1000)
    (src / "sub" / "b").write_bytes(os.urandom(300_000))
    (src / "empty").write_bytes(b"")
    os.link(src / "a", src / "a-link")
    os.symlink("sub/b", src / "to-b")
    os.setxattr(src / "a", "user.color", b"blue")
    os.setxattr(src / "sub", "user.dir", b"1")
    return src


def test_rsync_into_the_mount_converges(mounted, tmp_path: Path) -> None:
    src = _source(tmp_path)
    dst = mounted.path / "dst"
    sh("rsync", "-aHAX", f"{src}/", f"{dst}/")
    again = sh("rsync", "-aHAX", "-i", f"{src}/", f"{dst}/")
    assert again.stdout == "", f"second rsync changed things:\n{again.stdout[:2000]}"
    stats = sh("rsync", "-aHAX", "--stats", f"{src}/", f"{dst}/").stdout
    assert "Number of regular files transferred: 0" in stats, stats
    assert os.getxattr(dst / "a", "user.color") == b"blue"


def test_virtual_xattr_readable_by_name_not_listed(mounted) -> None:
    path = mounted.path / "f"
    write_file(path, b"data", fsync=True)
    os.setxattr(path, "user.mine", b"x")
    assert os.listxattr(path) == ["user.mine"]
    value = os.getxattr(path, REDUNDANCY)
    assert value in (b"inline", b"local") or b"/" in value, value
    assert sh("getfattr", "-n", REDUNDANCY, "--only-values", path).stdout == value.decode()
    dumped = sh("getfattr", "-d", path).stdout
    assert "user.mine" in dumped and REDUNDANCY not in dumped


def test_copying_out_does_not_plant_the_virtual_xattr(mounted, tmp_path: Path) -> None:
    path = mounted.path / "f"
    write_file(path, b"data" * 100, fsync=True)
    os.setxattr(path, "user.mine", b"x")
    out = tmp_path / "out"
    out.mkdir()
    sh("cp", "--preserve=xattr", path, out / "cp")
    sh("tar", "--xattrs", "--xattrs-include=user.*", "-C", mounted.path, "-cf",
       tmp_path / "t.tar", "f")
    sh("tar", "--xattrs", "--xattrs-include=user.*", "-C", out, "-xf", tmp_path / "t.tar")
    for copy in (out / "cp", out / "f"):
        assert os.listxattr(copy) == ["user.mine"], copy
