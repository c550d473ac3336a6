"""A partition between two machines of one keyfile (issue 17), in the network lab: 12 real
`fluidfs serve` peers and two real mounts, each in its own network namespace, split 5/7
by blackhole routes and healed again.

At most one side acknowledges writes at any time (the writer on the minority side stops
before the other can take the lease), and what the cut-off writer acknowledged but could
not publish is in its conflicts folder after the network heals and it mounts again.
"""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli
from labnodes import PORT, LabMount, LabPeer, start_all
from netlab import Host, Lab, lab_fixture  # noqa: F401 - the lab fixture
from peerhelpers import wait_for
from test_handover import conflicts_of, export_key, status, sync

from fluidfs import keys

pytestmark = [pytest.mark.mount, pytest.mark.network]

FAST = ["--lease-renew", "1", "--commit-quiet", "1", "--donate", "2G"]


def cut(side: list[Host], other: list[Host], *, off: bool) -> None:
    """Blackhole (or restore) every route from *side* to *other* and back."""
    for here, there in ((side, other), (other, side)):
        for host in here:
            for far in there:
                verb = "add" if off else "del"
                host.run("ip", "route", verb, "blackhole", f"{far.ip}/32", check=off)


class Writer(threading.Thread):
    """Writes <prefix>0.txt, ... into *root* until stopped; remembers when each succeeded."""

    def __init__(self, root: Path, prefix: str) -> None:
        super().__init__(daemon=True)
        self.root, self.prefix = root, prefix
        self.done: dict[str, tuple[str, float, float]] = {}  # name → text, start, end
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            name, text = f"{self.prefix}{i}.txt", f"{self.prefix} write {i}\n"
            started = time.time()
            try:
                (self.root / name).write_text(text)
                self.done[name] = (text, started, time.time())
            except OSError as exc:
                assert exc.errno in (errno.EROFS, errno.EIO), exc
            i += 1
            time.sleep(0.05)


def lab_mount(make_mount, name: str, host: Host, key: Path, *extra: str) -> LabMount:
    mnt = make_mount(name, key=key, extra=[*FAST, *extra])
    mnt.__class__ = LabMount
    mnt.host = host
    return mnt


def test_a_partition_lets_one_side_write_and_the_other_keeps_its_writes(
    lab: Lab, make_mount, tmp_path: Path
) -> None:
    keyfile = tmp_path / "partition.key"  # K = 4 of 12: the 7-peer side can read the tree
    keys.write_keyfile(keyfile, keys.generate(shards_total=12, shards_needed=4))
    peers = start_all([LabPeer(lab.public(f"p{i}"), tmp_path, ["--tolerance", "600"])
                       for i in range(12)])
    host_a, host_b = lab.public("ma"), lab.public("mb")
    a = lab_mount(make_mount, "a", host_a, keyfile, "--listen",
                  f"0.0.0.0:{PORT}", *[x for p in peers for x in ("--peer", p.addr)])
    a.mount()

    def first_write() -> bool:
        """With renewals every second, a loaded machine can let A's lease lapse for a
        moment (writes fail with EROFS until the next renewal reaches 7 of 12)."""
        try:
            (a.path / "first.txt").write_text("from A\n")
        except OSError as exc:
            assert exc.errno == errno.EROFS, exc
            return False
        return True

    wait_for(first_write, 60, "A to acknowledge its first write")
    wait_for(lambda: status(a)["commit"]["head_seq"] >= 1, 120, "A's first commit")
    sync(a)
    key = export_key(a, tmp_path / "exported.key")
    side_a = [host_a, *(p.host for p in peers[:5])]
    side_b = [host_b, *(p.host for p in peers[5:])]

    writer_a = Writer(a.path, "a")
    writer_a.start()
    wait_for(lambda: len(writer_a.done) >= 3, 60, "A's first writes")
    cut_at = time.time()
    cut(side_a, side_b, off=True)
    try:
        b = lab_mount(make_mount, "b", host_b, key, "--listen", f"0.0.0.0:{PORT}")
        b.mount("--takeover")  # 7 of 12 holders: B waits out A's lease, then writes
        seq = status(b)["commit"]["head_seq"]  # A's, as B restored it
        writer_b = Writer(b.path, "b")
        writer_b.start()
        # Both write side by side for 3 s at least, and until B has acknowledged a few
        # (on a machine at load 30, 3 s could pass without one)
        b_started = time.monotonic()
        wait_for(lambda: len(writer_b.done) >= 3, 60, "B's first writes")
        time.sleep(max(0.0, 3.0 - (time.monotonic() - b_started)))
        writer_b.stop.set()
        writer_b.join()
        writer_a.stop.set()
        writer_a.join()
        assert writer_b.done, "the majority side writes"
        last_a = max(end for _t, _s, end in writer_a.done.values())
        first_b = min(start for _t, start, _e in writer_b.done.values())
        assert last_a < first_b, "both sides acknowledged writes at the same time"

        def b_published() -> bool:
            """A commit of B's, with every write B acknowledged, on its side's peers.
            (Taking the head after the writers stopped raced with B's commit after its
            quiet second: on a loaded machine that commit came first, and none followed.)"""
            commit = status(b)["commit"]
            return commit["head_seq"] > seq and commit["published"] \
                and not commit["changes_pending"]

        wait_for(b_published, 120, "B's commit on its side's peers")
    finally:
        cut(side_a, side_b, off=False)
    wait_for(lambda: status(a)["commit"]["writer"] is False, 60, "A to see B's lease")
    a.unmount()
    b.unmount()
    a.mount()
    folders = conflicts_of(a)
    lost = []
    for name, (text, _s, _e) in writer_a.done.items():
        live = a.path / name
        kept = [f / name for f in folders if (f / name).exists()]
        in_tree = live.exists() and live.read_text() == text
        if not in_tree and not any(k.read_text() == text for k in kept):
            lost.append(name)
    assert not lost, f"{len(lost)} of A's {len(writer_a.done)} acknowledged writes lost"
    # What A acknowledged once cut off (its lease was still fresh) never reached B's side:
    # it is in A's conflicts folder, not in the live tree.
    late = [n for n, (_t, started, _e) in writer_a.done.items() if started > cut_at]
    assert late, "A acknowledged nothing after the cut: the test proves nothing"
    assert folders and all((folders[-1] / n).exists() for n in late), late
    print(f"A acknowledged {len(late)} writes after the cut; all in {folders[-1].name}")
    for name, (text, _s, _e) in writer_b.done.items():
        assert (a.path / name).read_text() == text, name
    result = run_cli("status", "--state-dir", str(a.state))
    assert result.returncode == 0
    if folders:
        assert ".fluidfs-conflicts/ holds writes" in result.stdout
    a.unmount()
