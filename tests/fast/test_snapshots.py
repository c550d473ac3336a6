"""Snapshots through the real CLI and a real mount: `.snapshots/`, EROFS, retention, forget."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from mounthelpers import drop_cache, expect_errno

pytestmark = pytest.mark.mount


def sync(mnt) -> dict:
    result = run_cli("sync", "--json", "--state-dir", str(mnt.state))
    assert result.returncode == 0, result.stderr + mnt.log()
    return json.loads(result.stdout)


def cli_json(mnt, *args: str) -> dict:
    result = run_cli(*args, "--json", "--state-dir", str(mnt.state))
    assert result.returncode == 0, result.stderr + mnt.log()
    return json.loads(result.stdout)


def snapshot_dirs(mnt) -> list[Path]:
    return [mnt.path / ".snapshots" / n for n in sorted(os.listdir(mnt.path / ".snapshots"))]


def test_old_versions_are_a_folder_away_and_read_only(make_mount) -> None:
    mnt = make_mount(extra=["--block-size", "256K"])
    mnt.mount()
    root = mnt.path
    big = os.urandom(700_000)
    (root / "big").write_bytes(big)
    (root / "doc.txt").write_text("version 1\n")
    (root / "gone.txt").write_text("deleted later\n")
    (root / "dir").mkdir()
    (root / "dir" / "inner").write_bytes(b"inner")
    os.symlink("doc.txt", root / "link")
    os.setxattr(root / "doc.txt", "user.tag", b"v1")
    os.utime(root / "doc.txt", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    assert sync(mnt)["committed"]
    assert not sync(mnt)["committed"], "nothing changed: no new commit"

    (root / "doc.txt").write_text("version 2, longer\n")
    os.unlink(root / "gone.txt")
    with open(root / "big", "r+b") as f:
        f.seek(300_000)
        f.write(b"X" * 1000)
    second = sync(mnt)
    assert second["committed"] and second["snapshot"]

    assert ".snapshots" not in os.listdir(root), "history is not listed, only reachable"
    old, new = snapshot_dirs(mnt)
    assert new.name == second["snapshot"]
    assert (old / "doc.txt").read_text() == "version 1\n"
    assert (old / "gone.txt").read_text() == "deleted later\n"
    assert (old / "big").read_bytes() == big
    assert os.getxattr(old / "doc.txt", "user.tag") == b"v1"
    assert os.stat(old / "doc.txt").st_mtime_ns == 1_600_000_000_123_456_789
    assert os.readlink(old / "link") == "doc.txt"
    assert (old / "link").read_text() == "version 1\n"
    assert (old / "dir" / "inner").read_bytes() == b"inner"
    assert (new / "doc.txt").read_text() == "version 2, longer\n"
    assert not (new / "gone.txt").exists()
    assert (new / "big").read_bytes()[300_000:301_000] == b"X" * 1000
    assert (root / "doc.txt").read_text() == "version 2, longer\n"

    rofs = errno.EROFS
    expect_errno(rofs, os.open, old / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(rofs, os.open, old / "doc.txt", os.O_WRONLY)
    expect_errno(rofs, os.open, old / "doc.txt", os.O_RDONLY | os.O_TRUNC)
    expect_errno(rofs, os.truncate, old / "doc.txt", 0)
    expect_errno(rofs, os.mkdir, old / "sub")
    expect_errno(rofs, os.rmdir, old / "dir")
    expect_errno(rofs, os.unlink, old / "doc.txt")
    expect_errno(rofs, os.rename, old / "doc.txt", old / "moved")
    expect_errno(rofs, os.rename, old / "doc.txt", root / "stolen")
    expect_errno(rofs, os.rename, root / "doc.txt", old / "planted")
    expect_errno(rofs, os.chmod, old / "doc.txt", 0o600)
    expect_errno(rofs, os.utime, old / "doc.txt")
    expect_errno(rofs, os.setxattr, old / "doc.txt", "user.x", b"1")
    expect_errno(rofs, os.removexattr, old / "doc.txt", "user.tag")
    expect_errno(rofs, os.symlink, "x", old / "sym")
    expect_errno(rofs, os.link, root / "doc.txt", old / "hard")
    expect_errno(rofs, os.rmdir, root / ".snapshots")
    expect_errno(rofs, os.rename, root / ".snapshots", root / "history")
    expect_errno(rofs, os.rename, root / "dir", root / ".snapshots")
    expect_errno(errno.EEXIST, os.mkdir, root / ".snapshots")
    assert (root / "doc.txt").read_text() == "version 2, longer\n"

    listed = cli_json(mnt, "snapshots")
    assert [s["name"] for s in listed["snapshots"]] == [old.name, new.name]
    assert listed["retention"] == "all=1d,hourly=1w,daily=90d"

    mnt.unmount()  # history survives a remount, rebuilt from shards
    drop_cache(mnt.state)
    mnt.mount()
    old, new = snapshot_dirs(mnt)
    assert (old / "big").read_bytes() == big
    assert (old / "gone.txt").read_text() == "deleted later\n"


def test_forget_releases_what_only_expired_snapshots_held(make_mount) -> None:
    mnt = make_mount(extra=["--block-size", "256K"])
    mnt.mount()
    data = os.urandom(4 * 256 * 1024)
    (mnt.path / "f").write_bytes(data)
    (mnt.path / "keep").write_bytes(os.urandom(300_000))
    sync(mnt)
    os.unlink(mnt.path / "f")
    sync(mnt)
    status = cli_json(mnt, "status")
    assert status["blocks"] == 4 + 2, "the deleted file is still held by the first snapshot"
    first, second = snapshot_dirs(mnt)
    assert (first / "f").read_bytes() == data

    dry = run_cli("forget", "--dry-run", "--state-dir", str(mnt.state))
    assert dry.returncode == 0 and "nothing to forget" in dry.stdout, dry.stdout
    bad = run_cli("forget", "no-such-snapshot", "--state-dir", str(mnt.state))
    assert bad.returncode == 1 and "no such snapshot" in bad.stderr
    gone = run_cli("forget", first.name, "--state-dir", str(mnt.state))
    assert gone.returncode == 0, gone.stderr
    assert f"forgot 1 snapshot: {first.name}" in gone.stdout
    assert [p.name for p in snapshot_dirs(mnt)] == [second.name]
    assert cli_json(mnt, "status")["blocks"] == 2, "the deleted file's blocks were released"
    assert (mnt.path / "keep").stat().st_size == 300_000
    assert not (second / "f").exists()


def test_retention_is_applied_at_every_commit(make_mount) -> None:
    mnt = make_mount(extra=["--retention", "all=0s"])
    mnt.mount()
    for i in range(3):
        (mnt.path / "f").write_text(f"round {i}\n")
        sync(mnt)
    (newest,) = snapshot_dirs(mnt)
    assert (newest / "f").read_text() == "round 2\n"
    listed = cli_json(mnt, "snapshots")
    assert [(s["name"], s["kept_by"]) for s in listed["snapshots"]] == [(newest.name, "newest")]
    wider = cli_json(mnt, "snapshots", "--retention", "daily=7d")
    assert wider["retention"] == "daily=1w"


def test_bad_retention_is_a_usage_error(make_mount, tmp_path: Path) -> None:
    mnt = make_mount()
    result = run_cli("mount", str(mnt.path), "--state-dir", str(mnt.state), "--keyfile",
                     str(mnt.keyfile), "--retention", "yearly=3")
    assert result.returncode == 2
    assert "bad retention rule" in result.stderr and len(result.stderr.splitlines()) == 1
