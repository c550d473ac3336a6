"""Remount anywhere from the keyfile: 12 real peers, machines A and B as real mounts.

Sizes are scaled for CI (a 64 MiB file and ~2,000 files instead of 300 MiB and a few
thousand). ``FLUIDFS_REMOUNT_FULL=1`` runs the issue's sizes: a 300 MiB file, and a copy
of a real tree (``/usr/share/doc`` unless ``FLUIDFS_REMOUNT_TREE`` names another)
beside the generated one; see docs/remount-and-snapshots.md for the figures.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from conftest import run_cli
from mounthelpers import sh, snapshot
from peerhelpers import Peer, running_peers, wait_for

from fluidfs import keys

pytestmark = [pytest.mark.mount, pytest.mark.network]

MiB = 1 << 20
FULL = bool(os.environ.get("FLUIDFS_REMOUNT_FULL"))
REAL_TREE = Path(os.environ.get("FLUIDFS_REMOUNT_TREE", "/usr/share/doc"))


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Twelve peers shared by the tests here (each test has its own keyfile)."""
    root = tmp_path_factory.mktemp("peers")
    with running_peers(root, 12) as made:
        yield made


def revive(peers: list[Peer]) -> None:
    for peer in peers:
        if peer.proc is None or peer.proc.poll() is not None:
            peer.start()


def machine(make_mount, name: str, key: Path, *extra: str):
    return make_mount(name, key=key, extra=["--listen", "127.0.0.1:0", "--donate", "2G", *extra])


def peer_args(peers: list[Peer]) -> list[str]:
    return [arg for p in peers for arg in ("--peer", p.addr)]


def sync(mnt) -> dict:
    result = run_cli("sync", "--json", "--state-dir", str(mnt.state), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr + mnt.log()
    reply = json.loads(result.stdout)
    assert reply["full"] and reply["published"], reply
    return reply


def export_key(mnt, target: Path) -> Path:
    result = run_cli("key", "export", "--with-peers", "--keyfile", str(mnt.keyfile),
                     "--state-dir", str(mnt.state))
    assert result.returncode == 0, result.stderr
    target.write_text(result.stdout)
    os.chmod(target, 0o600)
    assert len(keys.read_keyfile(target).peers) >= 8
    return target


def build_tree(root: Path, files: int, big: int, seed: int = 7) -> None:
    """A tree with what a home directory has: nesting, many small files, a big one, links,
    hard links, xattrs, odd modes and names, an empty directory, a fifo and set times."""
    rng = random.Random(seed)
    root.mkdir()
    dirs = [root]
    for top in range(12):
        d = root / f"top{top:02d}"
        d.mkdir()
        dirs.append(d)
        for sub in range(rng.randrange(2, 8)):
            s = d / f"sub {sub} é"
            s.mkdir()
            dirs.append(s)
    (root / "empty").mkdir()
    made = []
    for i in range(files):
        size = rng.choice([0, 40, 700, 3000, 4096, 9000, 40_000, 150_000])
        path = rng.choice(dirs) / f"f{i:05d}.{rng.choice(['txt', 'dat', 'jpg'])}"
        path.write_bytes(rng.randbytes(size))
        os.chmod(path, rng.choice([0o600, 0o644, 0o640, 0o755, 0o400]))
        made.append(path)
    with open(root / "top00" / "big.bin", "wb") as f:
        chunk = rng.randbytes(MiB)
        for i in range(big // MiB):
            f.write(chunk[i:] + chunk[:i])
    for i in range(40):
        target = rng.choice(made)
        link = rng.choice(dirs) / f"link{i}"
        os.symlink(os.path.relpath(target, link.parent), link)
    os.symlink("does/not/exist", root / "dangling")
    for i in range(20):
        source = made[i * 7]
        os.link(source, rng.choice(dirs) / f"hard{i}")
    for i in range(30):
        os.setxattr(made[i * 11], "user.note", f"note {i}".encode())
    os.setxattr(root / "top01", "user.dir", b"on a directory")
    os.mkfifo(root / "fifo")
    for path in [*made[::3], root / "fifo"]:
        os.utime(path, ns=(rng.randrange(10**18, 2 * 10**18), rng.randrange(10**18, 2 * 10**18)))
    for d in reversed(dirs):
        os.utime(d, ns=(rng.randrange(10**18, 2 * 10**18), rng.randrange(10**18, 2 * 10**18)))


def same_tree(source: Path, copy: Path) -> None:
    """diff -r (links not followed) and every attribute a user can see."""
    result = sh("diff", "-r", "--no-dereference", source, copy, check=False)
    fifo_only = [
        line for line in result.stdout.splitlines() if "is a fifo while file" not in line
    ]
    assert not fifo_only and not result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
    expected, got = snapshot(source, inodes=False), snapshot(copy, inodes=False)
    assert expected.keys() == got.keys()
    for path in expected:
        assert got[path] == expected[path], path


def link_groups(root: Path) -> set[frozenset[str]]:
    """Names that share an inode (hard links), as sets of paths relative to *root*."""
    groups: dict[int, set[str]] = {}
    for path in root.rglob("*"):
        st = path.lstat()
        if st.st_nlink > 1 and not path.is_dir():
            groups.setdefault(st.st_ino, set()).add(str(path.relative_to(root)))
    return {frozenset(g) for g in groups.values()}


def hard_links_intact(source: Path, copy: Path) -> None:
    expected = link_groups(source)
    assert len(expected) >= 20
    assert link_groups(copy) == expected


def test_fresh_machine_gets_the_whole_tree_back(make_mount, peers, tmp_path: Path) -> None:
    source = tmp_path / "source"
    big = 300 * MiB if FULL else 64 * MiB
    build_tree(source, files=2000, big=big)
    if FULL:
        sh("cp", "-a", REAL_TREE, source / "real")
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", *peer_args(peers))
    a.mount()
    started = time.monotonic()
    sh("cp", "-a", f"{source}/.", a.path)
    first = sync(a)
    sync_seconds = time.monotonic() - started
    key = export_key(a, tmp_path / "exported.key")
    a.unmount()
    assert first["committed"] and first["nodes_written"] > 10

    b = machine(make_mount, "b", key)  # new state dir, new port, only the keyfile
    started = time.monotonic()
    b.mount()
    mounted_in = time.monotonic() - started
    same_tree(source, b.path)
    hard_links_intact(source, b.path)
    assert os.readlink(b.path / "dangling") == "does/not/exist"
    status = json.loads(run_cli("status", "--json", "--state-dir", str(b.state)).stdout)
    assert status["commit"]["restored"]["seq"] == first["seq"]
    # B is the writer now: it changes the tree and a third machine sees the change
    (b.path / "from-b.txt").write_text("written on B\n")
    sync(b)
    b.unmount()
    c = machine(make_mount, "c", key)
    c.mount()
    assert (c.path / "from-b.txt").read_text() == "written on B\n"
    assert (c.path / "top00" / "big.bin").stat().st_size == big
    print(f"A: cp + sync {sync_seconds:.1f} s; B: mount {mounted_in:.1f} s")


def test_sigkill_after_sync_with_four_peers_down(make_mount, peers, tmp_path: Path) -> None:
    """A's lease outlives its crash: a plain mount elsewhere is refused, --takeover waits
    it out and gets the whole tree with four of the twelve peers down.

    A renews every 10 s, so its lease stays live 20 to 30 s after the kill (3 renewal
    intervals after its last renewal): the refused mount's start and its look at the
    peers must fit in there. With the default 5 s (10 to 15 s) a heavily loaded machine
    could start it after the lease had expired, and the mount was not refused."""
    source = tmp_path / "source"
    build_tree(source, files=2000 if FULL else 400, big=(300 if FULL else 8) * MiB, seed=11)
    if FULL:
        sh("cp", "-a", REAL_TREE, source / "real")
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--lease-renew", "10",
                *peer_args(peers))
    a.mount()
    sh("cp", "-a", f"{source}/.", a.path)
    sync(a)
    key = export_key(a, tmp_path / "exported.key")
    a.kill9()  # the laptop is gone: no unmount, its lease still looks alive
    try:
        for peer in peers[:4]:
            peer.kill()
        b = machine(make_mount, "b", key)
        refused = run_cli("mount", str(b.path), "--state-dir", str(b.state), "--keyfile",
                          str(key), *b.extra)
        assert refused.returncode == 1
        assert str(a.path) in refused.stderr and "--takeover" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        b.mount("--takeover")
        same_tree(source, b.path)
        hard_links_intact(source, b.path)
    finally:
        revive(peers)


def test_second_live_mount_is_refused_and_takeover_stops_the_old_writer(
    make_mount, peers, tmp_path: Path
) -> None:
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--lease-renew", "1",
                "--commit-quiet", "1", *peer_args(peers))
    a.mount()
    (a.path / "note.txt").write_text("from A\n")
    wait_for(lambda: _status(a)["commit"]["head_seq"] >= 1, 30, "A's automatic commit")
    key = export_key(a, tmp_path / "exported.key")

    b = machine(make_mount, "b", key, "--lease-renew", "1")
    refused = run_cli("mount", str(b.path), "--state-dir", str(b.state), "--keyfile", str(key),
                      *b.extra)
    assert refused.returncode == 1, refused.stdout
    assert f"mounted on host {os.uname().nodename} at {a.path}" in refused.stderr
    assert not os.listdir(b.path)

    b.mount("--takeover")
    assert (b.path / "note.txt").read_text() == "from A\n"
    wait_for(lambda: _erofs(a.path / "late.txt"), 15, "A to stop writing")
    assert _status(a)["commit"]["writer"] is False
    assert (a.path / "note.txt").read_text() == "from A\n"  # A still reads
    (b.path / "note.txt").write_text("from B\n")
    sync(b)
    a.unmount()  # the old writer publishes nothing on its way out
    b.unmount()
    c = machine(make_mount, "c", key)
    c.mount()
    assert (c.path / "note.txt").read_text() == "from B\n"
    assert not (c.path / "late.txt").exists()


def _status(mnt) -> dict:
    result = run_cli("status", "--json", "--state-dir", str(mnt.state))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _erofs(path: Path) -> bool:
    try:
        path.write_text("should not land\n")
    except OSError as exc:
        return exc.errno == errno.EROFS
    path.unlink()
    return False


def test_old_or_forged_root_record_does_not_win(make_mount, peers, tmp_path: Path) -> None:
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", *peer_args(peers))
    a.mount()
    (a.path / "v.txt").write_text("version 1\n")
    old_seq = sync(a)["seq"]
    me = keys.KeyRing(keys.read_keyfile(a.keyfile)).public_key
    record = f"{me.hex()}.root"
    old = (peers[0].state / "records" / record).read_bytes()
    (a.path / "v.txt").write_text("version 2\n")
    new_seq = sync(a)["seq"]
    assert new_seq > old_seq
    a.unmount()
    newest = (peers[1].state / "records" / record).read_bytes()
    from fluidfs.peers.rootrecord import parse

    forged = _forge(newest, seq=10**6)
    try:
        for peer in peers[:2]:
            peer.kill()
        (peers[0].state / "records" / record).write_bytes(old)  # replays an old valid root
        (peers[1].state / "records" / record).write_bytes(forged)  # claims a newer one
        assert parse(forged).seq == 10**6 and not parse(forged).signed_ok()
        revive(peers)
        only_liars = tmp_path / "liars.key"  # B starts from these two peers alone
        keys.write_keyfile(only_liars, keys.with_peers(keys.read_keyfile(a.keyfile),
                                                       [peers[0].addr, peers[1].addr]))
        b = machine(make_mount, "b", only_liars)
        b.mount()
        assert (b.path / "v.txt").read_text() == "version 2\n"
        assert _status(b)["commit"]["restored"]["seq"] == new_seq
        assert "served a bad root record" in (b.state / "fluidfs.log").read_text()
    finally:
        revive(peers)


def _forge(raw: bytes, seq: int) -> bytes:
    import cbor2

    data = cbor2.loads(raw)
    data["seq"] = seq
    return cbor2.dumps(data)


def test_key_export_prints_a_usable_keyfile(make_mount, peers, tmp_path: Path) -> None:
    # three peers are no quorum: a keyfile used nowhere yet is declared new
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--new", *peer_args(peers[:3]))
    a.mount()
    plain = run_cli("key", "export", "--keyfile", str(a.keyfile))
    assert plain.returncode == 0 and plain.stdout == (a.keyfile).read_text()
    assert "keep it somewhere safe" in plain.stderr
    exported = keys.loads(run_cli("key", "export", "--with-peers", "--keyfile", str(a.keyfile),
                                  "--state-dir", str(a.state)).stdout)
    assert exported.root == keys.read_keyfile(a.keyfile).root
    assert set(exported.peers) >= {f"{p.peer_id}@{p.addr}" for p in peers[:3]}
    a.unmount()  # with the node stopped the addresses come from its state directory
    offline = keys.loads(run_cli("key", "export", "--with-peers", "--keyfile", str(a.keyfile),
                                 "--state-dir", str(a.state)).stdout)
    # discovery may learn more peers between the two exports; the ones we gave must be there
    assert set(offline.peers) >= {f"{p.peer_id}@{p.addr}" for p in peers[:3]}
    shutil.rmtree(a.state)
    missing = run_cli("key", "export", "--with-peers", "--keyfile", str(a.keyfile),
                      "--state-dir", str(a.state))
    assert missing.returncode == 1 and "no peer addresses" in missing.stderr


def test_files_written_before_there_were_peers_move_onto_peers(
    make_mount, peers, tmp_path: Path
) -> None:
    revive(peers)
    # no peers at all; the block size is set so that the file is five blocks
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--block-size", "4M")
    a.mount()
    early = os.urandom(5 * 4 * MiB)  # five 4 MiB blocks
    (a.path / "early.bin").write_bytes(early)
    (a.path / "notes.txt").write_text("written before there were peers\n")
    wait_for(lambda: _status(a)["redundancy"] == {"local": 5}, 60, "blocks sealed locally")
    assert _status(a)["local_shard_bytes"] >= len(early)
    shown = run_cli("status", "--state-dir", str(a.state))
    assert shown.returncode == 0, shown.stderr
    assert "5 blocks not yet on peers" in shown.stdout
    assert "at most 64.0M/s" in shown.stdout  # the repair cap
    for peer in peers:
        added = run_cli("peers", "add", peer.addr, "--state-dir", str(a.state))
        assert added.returncode == 0, added.stderr
    wait_for(lambda: _status(a)["peers_with_agreements"] == 12, 60, "agreements with 12")
    assert sync(a)["local_only_blocks"] == 0  # sync waits for them to move
    assert _status(a)["redundancy"] == {"12": 5}
    assert _status(a)["moved_to_peers_blocks"] == 5
    wait_for(lambda: _status(a)["local_shard_bytes"] == 0, 30, "local shards deleted")
    key = export_key(a, tmp_path / "exported.key")
    a.unmount()

    b = machine(make_mount, "b", key)  # this laptop died: only the keyfile is left
    b.mount()
    assert (b.path / "early.bin").read_bytes() == early
    assert (b.path / "notes.txt").read_text() == "written before there were peers\n"


def test_old_snapshot_reads_on_a_fresh_machine_after_repair_moved_its_shards(
    make_mount, peers, tmp_path: Path
) -> None:
    """An old snapshot names the holders its blocks had when it was taken; repair can
    move those shards later. A fresh machine must still find them."""
    revive(peers)
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--audit-interval", "1",
                "--tolerance", "3", "--block-size", "4M", *peer_args(peers))  # 3 blocks
    a.mount()
    old = os.urandom(4 * MiB + 12345)
    current = os.urandom(4 * MiB)
    (a.path / "old.bin").write_bytes(old)
    (a.path / "current.bin").write_bytes(current)
    first = sync(a)  # its snapshot names old.bin's blocks with their holders of now
    (a.path / "old.bin").unlink()
    (a.path / "new.txt").write_text("after\n")
    sync(a)  # old.bin lives on only in the first snapshot
    with running_peers(tmp_path / "more", 5) as newcomers:
        for peer in newcomers:
            assert run_cli("peers", "add", peer.addr, "--state-dir", str(a.state)).returncode == 0
        wait_for(lambda: _status(a)["peers_with_agreements"] == 17, 60, "agreements with 17")
        try:
            for peer in peers[:5]:  # more than N-K of every block's recorded holders
                peer.kill()
            wait_for(lambda: _status(a)["peers_with_agreements"] == 12, 60,
                     "the dead peers' agreements to end")
            wait_for(lambda: _status(a)["redundancy"] == {"12": 3}, 120,
                     "the blocks re-created on the newcomers")
            key = export_key(a, tmp_path / "exported.key")
            a.unmount()
            b = machine(make_mount, "b", key)
            b.mount()
            # The committed holders are out of date; check looks further before it
            # calls anything lost.
            checked = run_cli("check", "--state-dir", str(b.state))
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert "0 unrecoverable" in checked.stdout and "/current.bin" in checked.stdout
            assert (b.path / "current.bin").read_bytes() == current
            snap = b.path / ".snapshots" / first["snapshot"]
            assert (snap / "old.bin").read_bytes() == old
            assert (b.path / "new.txt").read_text() == "after\n"
        finally:
            revive(peers)


def test_an_idle_mount_leaves_its_tree_alone_until_a_holder_changes(
    make_mount, peers, tmp_path: Path
) -> None:
    """Refresh commits re-serialise the whole tree; they run only when they would
    name different holders."""
    revive(peers)
    a = machine(make_mount, "a", tmp_path / "fluidfs.key", "--refresh-interval", "1",
                "--audit-interval", "1", "--tolerance", "3", *peer_args(peers))
    a.mount()
    (a.path / "f.bin").write_bytes(os.urandom(4 * MiB))
    sync(a)
    time.sleep(2)  # the one follow-up refresh for the commit's own nodes, if any
    reads = _status(a)["commit"]["tree_reads"]
    time.sleep(5)  # five refresh intervals with nothing new
    assert _status(a)["commit"]["tree_reads"] == reads
    try:
        peers[0].kill()  # its agreement ends: every block loses a holder
        wait_for(lambda: _status(a)["peers_with_agreements"] == 11, 60, "the agreement to end")
        wait_for(lambda: _status(a)["commit"]["tree_reads"] > reads, 30,
                 "a refresh commit naming the new holders")
    finally:
        revive(peers)
