"""Handing the writer lease over between real mounts (issue 17), with 12 real peers.

Machine A writes in a loop while machine B mounts the same keyfile with ``--takeover``:
every write that returned success must be in the tree a fresh machine restores. And a
writer that cannot be reached (stopped with SIGSTOP) is waited out with a countdown, and
once it runs again it writes nothing more.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli
from peerhelpers import running_peers, wait_for

pytestmark = [pytest.mark.mount, pytest.mark.network]


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    with running_peers(root, 12) as made:
        yield made


def machine(make_mount, name: str, key: Path, *extra: str):
    return make_mount(name, key=key, extra=["--listen", "127.0.0.1:0", "--donate", "2G",
                                            "--lease-renew", "1", *extra])


def export_key(mnt, target: Path) -> Path:
    result = run_cli("key", "export", "--with-peers", "--keyfile", str(mnt.keyfile),
                     "--state-dir", str(mnt.state))
    assert result.returncode == 0, result.stderr
    target.write_text(result.stdout)
    os.chmod(target, 0o600)
    return target


def status(mnt) -> dict:
    result = run_cli("status", "--json", "--state-dir", str(mnt.state))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def sync(mnt) -> None:
    result = run_cli("sync", "--json", "--state-dir", str(mnt.state), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr + mnt.log()


class Writer(threading.Thread):
    """Writes w0.txt, w1.txt, ... into *root* until stopped; remembers which succeeded."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.done: dict[str, str] = {}
        self.refused = 0
        self.unexpected: list[str] = []  # errors other than a refusal, with the file's name
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            name, text = f"w{i}.txt", f"write {i} at {time.time()}\n"
            try:
                (self.root / name).write_text(text)
                self.done[name] = text
            except OSError as exc:
                # EROFS from open() or write(); EIO from close() when the write went into
                # the kernel's page cache (the mount uses FUSE's writeback cache) and
                # writing it back got EROFS: the kernel reports any failed write-back as
                # EIO. Either way the write was refused, not acknowledged.
                if exc.errno not in (errno.EROFS, errno.EIO):
                    self.unexpected.append(f"{name}: {exc!r}")
                    return
                self.refused += 1
            i += 1
            time.sleep(0.05)


def test_writes_acknowledged_through_a_takeover_are_all_in_the_restored_tree(
    make_mount, peers, tmp_path: Path
) -> None:
    """Before: A kept acknowledging writes for seconds after B took over, and none of
    them reached B or a fresh machine."""
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--commit-quiet", "1",
                *[arg for p in peers for arg in ("--peer", p.addr)])
    a.mount()
    (a.path / "first.txt").write_text("from A\n")
    wait_for(lambda: status(a)["commit"]["head_seq"] >= 1, 60, "A's first commit")
    key = export_key(a, tmp_path / "exported.key")
    writer = Writer(a.path)
    writer.start()
    time.sleep(1.0)
    b = machine(make_mount, "b", key)
    before = len(writer.done)
    b.mount("--takeover")
    time.sleep(2.0)  # A goes on trying: each later write must fail
    writer.stop.set()
    writer.join()
    assert not writer.unexpected, (writer.unexpected, a.log())
    lost = [n for n, text in writer.done.items()
            if not (b.path / n).exists() or (b.path / n).read_text() != text]
    assert not lost, f"{len(lost)} writes acknowledged on A are not on B: {lost[:5]}"
    assert before > 0 and writer.refused > 0, (before, writer.refused)
    assert status(a)["commit"]["writer"] is False
    sync(b)
    b.unmount()
    a.unmount()
    c = machine(make_mount, "c", key)
    c.mount()
    missing = [n for n, text in writer.done.items()
               if not (c.path / n).exists() or (c.path / n).read_text() != text]
    assert not missing, f"{len(missing)} of {len(writer.done)} acknowledged writes lost"
    c.unmount()


def test_an_unreachable_writer_is_waited_out_with_a_countdown_and_then_fenced(
    make_mount, peers, tmp_path: Path
) -> None:
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--commit-quiet", "1",
                *[arg for p in peers for arg in ("--peer", p.addr)])
    a.mount()
    (a.path / "first.txt").write_text("from A\n")
    wait_for(lambda: status(a)["commit"]["head_seq"] >= 1, 60, "A's first commit")
    sync(a)
    key = export_key(a, tmp_path / "exported.key")
    pid = a.pid()
    os.kill(pid, signal.SIGSTOP)  # A's machine is off the network: nothing answers
    try:
        b = machine(make_mount, "b", key)
        started = time.monotonic()
        result = b.mount("--takeover")
        waited = time.monotonic() - started
        assert waited >= 3 + 2, waited  # T = 3 renewals of 1 s, margin 2 s
        assert "taking it in" in result.stderr, result.stderr
        assert (b.path / "first.txt").read_text() == "from A\n"
    finally:
        os.kill(pid, signal.SIGCONT)
    # A runs again: its next renewal meets B's fence, and it stops writing.
    wait_for(lambda: status(a)["commit"]["writer"] is False, 30, "A to learn it was replaced")
    with pytest.raises(OSError) as err:
        (a.path / "late.txt").write_text("stale\n")
    assert err.value.errno == errno.EROFS
    sync(b)
    b.unmount()
    a.unmount()
    c = machine(make_mount, "c", key)
    c.mount()
    assert (c.path / "first.txt").read_text() == "from A\n"
    assert not (c.path / "late.txt").exists()
    c.unmount()


def conflicts_of(mnt) -> list[Path]:
    """The folders of *mnt*'s .fluidfs-conflicts/."""
    folder = mnt.path / ".fluidfs-conflicts"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_writes_of_a_replaced_writer_come_back_in_its_conflicts_folder(
    make_mount, peers, tmp_path: Path
) -> None:
    """A acknowledges writes it has not committed yet, then its machine stops (SIGSTOP):
    B takes over and writes; A's writes are not on B. A's next mount of the same state
    directory takes B's tree and puts A's writes under .fluidfs-conflicts/<host>-<time>/,
    where a fresh machine from the keyfile also finds them: every acknowledged write is
    somewhere. Before: A's state directory was refused as behind the network."""
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--commit-quiet", "1",
                *[arg for p in peers for arg in ("--peer", p.addr)])
    a.mount()
    (a.path / "first.txt").write_text("from A\n")
    (a.path / "keep").mkdir()
    wait_for(lambda: status(a)["commit"]["head_seq"] >= 1 and status(a)["commit"]["published"],
             60, "A's first commit, published")
    key = export_key(a, tmp_path / "exported.key")
    a.unmount()
    a.mount("--commit-quiet", "600")  # what A acknowledges now waits for its next commit
    late = {f"keep/late{i}.txt": f"acknowledged by A, not committed {i}\n" for i in range(20)}
    for name, text in late.items():
        (a.path / name).write_text(text)
    (a.path / "first.txt").write_text("changed on A\n")
    late["first.txt"] = "changed on A\n"
    pid = a.pid()
    os.kill(pid, signal.SIGSTOP)  # A's machine is off the network: it cannot hand over
    try:
        b = machine(make_mount, "b", key)
        b.mount("--takeover")
        assert (b.path / "first.txt").read_text() == "from A\n"
        assert not (b.path / "keep" / "late0.txt").exists(), "never committed by A"
        (b.path / "from-b.txt").write_text("B's own\n")
        sync(b)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: status(a)["commit"]["unpublished"] is True, 30, "A to warn")
    a.unmount()
    b.unmount()
    a.mount()  # the same state directory: no refusal, B's tree, A's writes kept
    assert (a.path / "from-b.txt").read_text() == "B's own\n"
    assert (a.path / "first.txt").read_text() == "from A\n"
    (folder,) = conflicts_of(a)
    assert folder.name.startswith(os.uname().nodename + "-"), folder.name
    for name, text in late.items():
        assert (folder / name).read_text() == text, name
    shown = status(a)["commit"]
    assert shown["conflicts"] == [folder.name]
    text = run_cli("status", "--state-dir", str(a.state)).stdout
    assert ".fluidfs-conflicts/ holds writes" in text, text
    assert ".fluidfs-conflicts/" in a.log()
    sync(a)
    a.unmount()
    c = machine(make_mount, "c", key)
    c.mount()
    kept = c.path / ".fluidfs-conflicts" / folder.name
    lost = [n for n, t in late.items() if not (kept / n).exists() or (kept / n).read_text() != t]
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:5]}"
    assert (c.path / "from-b.txt").read_text() == "B's own\n"
    c.unmount()
