"""What survives a crash, a signal and an unmount: the "nothing acknowledged is lost" promise."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import is_mounted, run_cli
from mounthelpers import (
    MiB,
    ShardTable,
    block_records,
    opened,
    pread,
    snapshot,
    wait_gone,
    write_file,
)
from peerhelpers import mount_with_peers, status, wait_for

from fluidfs.blocks.record import NO_HOLDER

pytestmark = pytest.mark.mount

BS = 256 * 1024


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_fsynced_data_survives_kill9(mounted) -> None:
    root = mounted.path
    files = {
        "tiny": b"inline data",
        "one-block": os.urandom(BS),
        "multi/deep/many-blocks": os.urandom(9 * BS + 321),
        "multi/edge": os.urandom(4097),
    }
    os.makedirs(root / "multi/deep")
    for name, data in files.items():
        write_file(root / name, data, fsync=True)
    # overwrite the middle of a sealed file and fsync again
    with opened(root / "multi/deep/many-blocks", os.O_WRONLY) as fd:
        os.pwrite(fd, b"PATCH" * 100, 3 * BS - 200)
        os.fsync(fd)
    patched = bytearray(files["multi/deep/many-blocks"])
    patched[3 * BS - 200 : 3 * BS + 300] = b"PATCH" * 100
    files["multi/deep/many-blocks"] = bytes(patched)
    # a rename and a truncate, made durable
    os.rename(root / "one-block", root / "multi/renamed")
    files["multi/renamed"] = files.pop("one-block")
    with opened(root / "multi/edge", os.O_WRONLY) as fd:
        os.ftruncate(fd, 100)
        os.fsync(fd)
    files["multi/edge"] = files["multi/edge"][:100]
    _fsync_dir(root / "multi")

    mounted.kill9()
    assert not is_mounted(mounted.path)
    mounted.mount()
    for name, data in files.items():
        assert (root / name).read_bytes() == data, name
    assert not (root / "one-block").exists()
    assert sorted(os.listdir(root)) == ["multi", "tiny"]


def _traced_tasks(pid: int) -> bool:
    """True once every thread of *pid* has a tracer attached."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
            if "TracerPid:\t0\n" in status:
                return False
    return True


def test_fsync_syncs_an_unplaced_blocks_only_copy(make_mount, peer_cluster, tmp_path) -> None:
    """With peers, a sealed block's cached plaintext is its only copy until its shards
    are placed (here never: the one peer refuses every store). After fsync returns, the
    block's cache file and its directory have been synced (strace on the mount sees the
    calls, status counts them), and the file survives kill -9 and a remount. Fails on the
    old code: fsync synced the two LMDB environments and no cache file, so a power loss
    could leave the committed block map naming bytes that never reached the disk."""
    peers = peer_cluster(1, extra=lambda _i: ["--fault-rate", "1"])
    mnt = mount_with_peers(make_mount, peers, "--new")
    pid = mnt.pid()
    assert pid
    trace = tmp_path / "strace.log"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-y", "-e", "trace=fdatasync,fsync", "-o", str(trace),
         "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _traced_tasks(pid), 30, "strace attached to every thread")
        data = os.urandom(3 * BS + 100)  # four blocks, none inline
        write_file(mnt.path / "f", data, fsync=True)
        counted = status(mnt.state)["fsync_synced_blocks"]
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
    ino = os.stat(mnt.path / "f").st_ino
    mnt.kill9()
    records = block_records(mnt.state, ino)
    assert len(records) == 4
    assert all(h == NO_HOLDER for r in records for h in r.holders), "placed: proves nothing"
    calls = trace.read_text()
    cache = mnt.state / "cache"
    for record in records:
        name = record.record.block_id.hex()
        path = cache / name[:2] / name
        assert re.search(rf"fdatasync\(\d+<{re.escape(str(path))}>\)", calls), (
            f"block {name[:12]} not synced:\n{calls[-2000:]}"
        )
        assert re.search(rf"fsync\(\d+<{re.escape(str(path.parent))}>\)", calls)
    assert counted >= 4
    mnt.mount()
    assert (mnt.path / "f").read_bytes() == data


def test_kill9_while_writing_then_remount(mounted) -> None:
    """A crash in the middle of a large write leaves a state that mounts and keeps
    everything fsynced before it."""
    root = mounted.path
    safe = os.urandom(5 * BS + 7)
    write_file(root / "safe", safe, fsync=True)
    writer = subprocess.Popen(
        ["dd", "if=/dev/urandom", f"of={root / 'busy'}", "bs=1M", "count=400", "status=none"],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (root / "busy").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Its name is durable once the directory is fsync'd; before that, a crash may
        # lose the create with the last second of metadata (docs/decisions.md, issue 15).
        _fsync_dir(root)
        while time.monotonic() < deadline:
            if os.stat(root / "busy").st_size > 20 * MiB:
                break
            time.sleep(0.05)
        mounted.kill9()
    finally:
        writer.kill()
        writer.wait()
    mounted.mount()
    assert (root / "safe").read_bytes() == safe
    # the half-written file is there, readable to its end, and can be replaced
    size = os.stat(root / "busy").st_size
    assert size <= 400 * MiB
    with open(root / "busy", "rb") as f:
        read = 0
        while chunk := f.read(8 * MiB):
            read += len(chunk)
    assert read == size
    write_file(root / "busy", b"fresh", fsync=True)
    assert (root / "busy").read_bytes() == b"fresh"
    mounted.unmount()
    mounted.mount()
    assert (root / "safe").read_bytes() == safe
    assert (root / "busy").read_bytes() == b"fresh"


def test_kill9_with_unlinked_open_file_reclaims_it(mounted) -> None:
    root = mounted.path
    keep = os.urandom(3 * BS)
    write_file(root / "keep", keep, fsync=True)
    write_file(root / "doomed", os.urandom(6 * BS), fsync=True)
    fd = os.open(root / "doomed", os.O_RDONLY)
    os.unlink(root / "doomed")
    _fsync_dir(root)
    mounted.kill9()
    with contextlib.suppress(OSError):
        os.close(fd)  # the mount is gone (ENOTCONN); this only drops our end
    mounted.mount()
    assert os.listdir(root) == ["keep"]
    assert (root / "keep").read_bytes() == keep
    mounted.unmount()
    shards = ShardTable(mounted.state)
    try:
        # only the 3 blocks of "keep" are stored, 12 shards each: the orphan's went
        assert shards.count() == 3 * 12
    finally:
        shards.close()


def test_unmount_remount_gives_identical_tree(mounted) -> None:
    root = mounted.path
    os.makedirs(root / "docs/private")
    os.makedirs(root / "empty-dir")
    write_file(root / "docs/report.txt", b"quarterly numbers\n" * 1000)
    write_file(root / "docs/private/secret", os.urandom(7 * BS + 11))
    write_file(root / "empty", b"")
    write_file(root / "tiny", b"t")
    with opened(root / "sparse", os.O_WRONLY | os.O_CREAT) as fd:
        os.pwrite(fd, b"hole before me", 40 * MiB)
    os.link(root / "docs/report.txt", root / "report-link")
    os.link(root / "docs/report.txt", root / "docs/private/report-link2")
    os.symlink("docs/report.txt", root / "rel-link")
    os.symlink("/absolute/dangling", root / "docs/dangling")
    os.setxattr(root / "docs/report.txt", "user.origin", b"finance")
    os.setxattr(root / "docs/report.txt", "user.binary", bytes(range(256)))
    os.setxattr(root / "docs", "user.dir", b"on a directory")
    os.chmod(root / "docs/private", 0o700)
    os.chmod(root / "docs/private/secret", 0o600)
    os.chmod(root / "tiny", 0o4755)
    os.chown(root / "docs/private/secret", 1234, 5678)
    os.chown(root / "tiny", 65534, 65534)
    os.lchown(root / "rel-link", 42, 43)
    # times last, children before parents (creating entries moves a directory's mtime)
    stamps = {
        "docs/private/secret": 1_111_111_111_123_456_789,
        "docs/report.txt": 1_222_222_222_000_000_001,
        "empty": 86_400_000_000_000,
        "tiny": 1_700_000_000_999_999_999,
        "sparse": 1_600_000_000_000_000_000,
        "docs/private": 1_300_000_000_000_000_500,
        "empty-dir": 1_400_000_000_000_000_000,
        "docs": 1_500_000_000_000_000_007,
    }
    for name, ns in stamps.items():
        os.utime(root / name, ns=(ns - 5, ns))
    os.utime(root / "rel-link", ns=(3, 4), follow_symlinks=False)

    before = snapshot(root)
    ctimes = {p: os.lstat(os.path.join(os.fsencode(root), p)).st_ctime_ns for p in before}
    mounted.unmount()
    mounted.mount()
    after = snapshot(root)
    assert set(after) == set(before)
    for path in before:
        assert after[path] == before[path], path
    for name, ns in stamps.items():
        assert os.stat(root / name).st_mtime_ns == ns, name
    ino = os.stat(root / "docs/report.txt").st_ino
    assert os.stat(root / "report-link").st_ino == ino
    assert os.stat(root / "docs/private/report-link2").st_ino == ino
    assert os.stat(root / "report-link").st_nlink == 3
    assert os.readlink(root / "docs/dangling") == "/absolute/dangling"
    assert os.lstat(root / "rel-link").st_uid == 42
    assert os.stat(root / "docs/private/secret").st_uid == 1234
    assert os.getxattr(root / "docs", "user.dir") == b"on a directory"
    assert pread(root / "sparse", 40 * MiB, 100) == b"hole before me"
    assert pread(root / "sparse", 20 * MiB, 100) == bytes(100)
    changed = {
        p: (ctimes[p], os.lstat(os.path.join(os.fsencode(root), p)).st_ctime_ns)
        for p in before
        if os.lstat(os.path.join(os.fsencode(root), p)).st_ctime_ns != ctimes[p]
    }
    assert not changed, f"ctime changed across remount: {changed}"


def test_sigterm_unmounts_cleanly(mounted) -> None:
    root = mounted.path
    data = os.urandom(6 * BS + 5)
    write_file(root / "written", data)  # closed, not fsynced
    os.mkdir(root / "dir")
    write_file(root / "dir/small", b"small")
    pid = mounted.pid()
    assert pid
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid), "the node did not exit on SIGTERM"
    assert not is_mounted(root), "SIGTERM left the mount behind"
    log = (mounted.state / "fluidfs.log").read_text()
    assert "unmounted" in log
    assert "Traceback" not in log, log
    assert os.listdir(mounted.state / "dirty") == [], "unsealed blocks left after a clean stop"
    mounted.mount()
    assert (root / "written").read_bytes() == data
    assert (root / "dir/small").read_bytes() == b"small"


def test_sigint_unmounts_cleanly(mounted) -> None:
    write_file(mounted.path / "f", b"before sigint")
    pid = mounted.pid()
    assert pid
    os.kill(pid, signal.SIGINT)
    assert wait_gone(pid)
    assert not is_mounted(mounted.path)
    mounted.mount()
    assert (mounted.path / "f").read_bytes() == b"before sigint"


def test_unmount_while_busy_refuses_and_keeps_mount(mounted) -> None:
    """`fluidfs unmount` on a busy mount says so and leaves it working."""
    (mounted.path / "f").write_bytes(b"x")
    busy = subprocess.Popen(["sleep", "60"], cwd=mounted.path)
    try:  # Popen returns once the child has exec'd, inside the mount: it is busy now
        assert os.readlink(f"/proc/{busy.pid}/cwd") == str(mounted.path)
        result = run_cli("unmount", str(mounted.path))
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert is_mounted(mounted.path)
        assert (mounted.path / "f").read_bytes() == b"x"
    finally:
        busy.kill()
        busy.wait()
    mounted.unmount()
    mounted.mount()
    assert (mounted.path / "f").read_bytes() == b"x"


def test_rsync_style_atomic_replace_survives_kill9(mounted) -> None:
    """The usual save pattern: write a temp file, fsync, rename over the old one, fsync dir."""
    root = mounted.path
    write_file(root / "config", b"version 1", fsync=True)
    for version in range(2, 6):
        tmp = root / f".config.tmp{version}"
        write_file(tmp, b"version %d" % version + os.urandom(BS), fsync=True)
        os.rename(tmp, root / "config")
        _fsync_dir(root)
    expected = (root / "config").read_bytes()
    mounted.kill9()
    mounted.mount()
    assert (root / "config").read_bytes() == expected
    assert os.listdir(root) == ["config"]


def test_kill9_while_rewriting_sealed_blocks_keeps_fsynced_data(make_mount) -> None:
    """A first write into a sealed block copies the block into a dirty file. A crash in
    the middle of that copy must not leave a half copy that the next mount adopts in
    place of the intact block: the fsynced bytes around the rewrite must all survive."""
    bs = 16 * MiB
    blocks = 6
    mnt = make_mount(extra=["--block-size", "16M"])
    mnt.mount()
    path = mnt.path / "f"
    original = os.urandom(blocks * bs)
    write_file(path, original, fsync=True)
    rng = random.Random(5)
    for round_ in range(3):
        stop = threading.Event()

        def churn(stop: threading.Event) -> None:
            i = 0
            while not stop.is_set():
                try:
                    with opened(path, os.O_WRONLY) as fd:
                        os.pwrite(fd, b"\xaa", (i % blocks) * bs + 7)  # not fsynced
                except OSError:
                    return  # the mount is gone
                i += 1

        worker = threading.Thread(target=churn, args=(stop,))
        worker.start()
        try:
            time.sleep(rng.uniform(0.2, 1.0))  # on purpose: the crash comes at a random moment
            mnt.kill9()
        finally:
            stop.set()
            worker.join()
        mnt.mount()
        with open(path, "rb") as f:
            for index in range(blocks):
                got = f.read(bs)
                want = original[index * bs : (index + 1) * bs]
                assert got[7:8] in (want[7:8], b"\xaa"), (round_, index)
                assert got[:7] == want[:7] and got[8:] == want[8:], (
                    f"round {round_}: block {index} lost fsynced data after kill -9"
                )
