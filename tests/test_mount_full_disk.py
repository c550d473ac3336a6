"""A full state disk: writers get ENOSPC, nothing acknowledged is lost, and it recovers.

The state directory lives on a small tmpfs of its own, so the mount, not the test
machine, runs out of room.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Mount, require_fuse, run_cli

pytestmark = pytest.mark.mount

MiB = 1 << 20


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_from_store(path: Path) -> bytes:
    """The file's bytes as the mount serves them, not as the kernel cached them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path.read_bytes()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_disk(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_state_disk_gives_enospc_and_loses_nothing(tmp_path, keyfile, small_disk):
    require_fuse()
    mnt = Mount(tmp_path / "mnt", small_disk / "state", keyfile)
    mnt.path.mkdir()
    try:
        mnt.mount()
        keep = os.urandom(8 * MiB + 4321)
        write_synced(mnt.path / "keep.bin", keep)

        filler = subprocess.run(
            ["dd", "if=/dev/urandom", f"of={mnt.path / 'filler.bin'}", "bs=1M", "count=100",
             "conv=fsync"], capture_output=True, text=True)
        assert filler.returncode != 0, filler.stderr + mnt.log()
        assert "No space left on device" in filler.stderr, filler.stderr + mnt.log()

        assert read_from_store(mnt.path / "keep.bin") == keep
        # dd's create was acknowledged: the file stays, whatever its writes could not do
        assert sorted(os.listdir(mnt.path)) == ["filler.bin", "keep.bin"], mnt.log()

        mnt.unmount()  # still full: unmount works, the unsealed rest waits on disk
        mnt.mount()
        assert (mnt.path / "keep.bin").read_bytes() == keep
        assert sorted(os.listdir(mnt.path)) == ["filler.bin", "keep.bin"], mnt.log()

        (mnt.path / "filler.bin").unlink()  # room again: writing works once more
        later = os.urandom(4 * MiB)
        deadline = time.monotonic() + 20
        while True:
            try:
                write_synced(mnt.path / "later.bin", later)
                break
            except OSError:
                assert time.monotonic() < deadline, "writes never worked again" + mnt.log()
                time.sleep(0.5)

        mnt.unmount()
        mnt.mount()
        assert digest(mnt.path / "keep.bin") == hashlib.sha256(keep).hexdigest()
        assert (mnt.path / "later.bin").read_bytes() == later
        check = run_cli("check", "--read-data", "--state-dir", str(mnt.state))
        assert check.returncode == 0, check.stdout + check.stderr + mnt.log()
        log = (mnt.state / "fluidfs.log").read_text()
        assert "disk" in log and "full" in log  # the node said why writes failed
        assert "Traceback" not in log  # and nothing failed unexpectedly on the way
    finally:
        mnt.cleanup()
