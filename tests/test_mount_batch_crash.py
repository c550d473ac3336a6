"""kill -9 of the mount in the middle of a stream of small-file creates (issue 15).

The mount's requests write metadata through a write-behind batch (store/batch.py): a
crash may lose the last second of requests no fsync covered, each whole or not at all.
What it must never lose is a file fsync'd, or a name whose directory was fsync'd, and it
must leave a tree that reads back and that ``fluidfs check`` accepts.

This pins the crash promise the batch must keep (the code before it committed every
request at once, so it kept it too); tests/fast/test_write_batch.py shows the batch.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import run_cli

FILES = 300
PER_DIR = 100
SYNC_EVERY = 7


def content(i: int) -> bytes:
    return (f"file {i} ".encode() * 40)[:200]


def test_kill9_during_creates_keeps_every_fsynced_file(make_mount) -> None:
    mnt = make_mount()
    mnt.mount()
    root = mnt.path / "stream"
    root.mkdir()
    synced: dict[Path, bytes] = {}  # fsync'd files
    named: list[Path] = []  # names made durable by an fsync of their directory
    for i in range(FILES):
        folder = root / f"d{i // PER_DIR}"
        if i % PER_DIR == 0:
            folder.mkdir()
        path = folder / f"f{i:04d}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, content(i))
            if i % SYNC_EVERY == 0:
                os.fsync(fd)
                synced[path] = content(i)
        finally:
            os.close(fd)
        if i == PER_DIR + 50:  # half of d1 so far: fsync the directory
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            named = sorted(folder.iterdir())
    # The last creates are in the open batch (or just committed): crash now.
    mnt.kill9()
    mnt.mount()

    for path, data in synced.items():
        assert path.read_bytes() == data, f"{path} was fsync'd"
    for path in named:
        assert path.exists(), f"{path.name} was named when its directory was fsync'd"
    survived = 0
    for folder in sorted(root.iterdir()):
        for path in sorted(folder.iterdir()):
            data = path.read_bytes()  # every name left reads back, whole or as a hole
            i = int(path.name[1:])
            assert data in (content(i), bytes(len(data))), path
            assert len(data) in (0, 200), path
            survived += 1
    assert survived >= len(synced)
    print(f"{survived} of {FILES} files survived the crash ({len(synced)} fsync'd)")
    check = run_cli("check", "--state-dir", str(mnt.state))
    assert check.returncode == 0, check.stdout + check.stderr + mnt.log()
    # The tree stays writable where the crash cut it.
    (root / "after").write_bytes(b"after the crash")
    assert (root / "after").read_bytes() == b"after the crash"
