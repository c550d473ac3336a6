"""A fresh machine never starts an empty backup that could replace the real one.

One `not_found` proves nothing: the peer may be new, may have lost its records, or may be
someone else answering at a bootstrap address. Real `fluidfs serve` peers and real mounts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Mount, is_mounted, require_fuse, run_cli
from peerhelpers import Peer, running_peers

from fluidfs import keys

pytestmark = [pytest.mark.mount, pytest.mark.network]

FILES = {"notes.txt": b"the real backup\n", "photo.jpg": os.urandom(300_000)}
FAST = ["--listen", "127.0.0.1:0", "--donate", "2G", "--restore-wait", "3"]


@dataclass
class Backup:
    keyfile: Path  # the user's keyfile, as `fluidfs key export --with-peers` wrote it
    owner: bytes
    roots: dict[str, bytes]  # each peer's copy of the root record, as it was


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    with running_peers(tmp_path_factory.mktemp("peers"), 12) as made:
        yield made


@pytest.fixture(scope="module")
def backup(peers, tmp_path_factory) -> Backup:
    """A backup of FILES on the 12 peers, made by machine A (now unmounted)."""
    require_fuse()
    root = tmp_path_factory.mktemp("machine-a")
    key = root / "fluidfs.key"
    keys.write_keyfile(key, keys.generate())
    a = Mount(root / "mnt", root / "state", key,
              [*FAST, *[arg for p in peers for arg in ("--peer", p.addr)]])
    a.path.mkdir()
    try:
        a.mount()
        for name, data in FILES.items():
            (a.path / name).write_bytes(data)
        synced = run_cli("sync", "--json", "--state-dir", str(a.state), timeout=300)
        assert synced.returncode == 0, synced.stderr + a.log()
        assert json.loads(synced.stdout)["published"]
        exported = run_cli("key", "export", "--with-peers", "--keyfile", str(key),
                           "--state-dir", str(a.state))
        assert exported.returncode == 0, exported.stderr
        a.unmount()
    finally:
        a.cleanup()
    user_key = root / "exported.key"
    user_key.write_text(exported.stdout)
    owner = keys.KeyRing(keys.read_keyfile(key)).public_key
    return Backup(user_key, owner, roots(peers, owner))


def roots(peers: list[Peer], owner: bytes) -> dict[str, bytes]:
    found = {}
    for peer in peers:
        path = peer.state / "records" / f"{owner.hex()}.root"
        if path.exists():
            found[peer.name] = path.read_bytes()
    return found


def keyfile_with(backup: Backup, path: Path, entries: list[str]) -> Path:
    keys.write_keyfile(path, keys.with_peers(keys.read_keyfile(backup.keyfile), entries))
    return path


def refused(mnt: Mount) -> str:
    """Mount, expecting a one-line refusal; return the line."""
    result = run_cli("mount", str(mnt.path), "--state-dir", str(mnt.state), "--keyfile",
                     str(mnt.keyfile), *mnt.extra, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr + mnt.log()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert not is_mounted(mnt.path) and not os.listdir(mnt.path)
    return lines[0]


def test_the_exported_keyfile_names_each_peer_by_its_id(backup: Backup, peers) -> None:
    entries = keys.read_keyfile(backup.keyfile).bootstrap()
    assert len(entries) >= 8
    ids = {p.addr: p.public_key for p in peers}
    assert all(e.key is not None and ids[e.addr] == e.key for e in entries)
    assert len(backup.roots) >= 8


def test_an_impostor_at_the_bootstrap_address_cannot_make_a_fresh_mount_start_empty(
    backup: Backup, peers, make_mount, tmp_path: Path
) -> None:
    real = peers[0]
    port = int(real.addr.rsplit(":", 1)[1])
    pinned = keyfile_with(backup, tmp_path / "pinned.key", [f"{real.peer_id}@{real.addr}"])
    plain = keyfile_with(backup, tmp_path / "plain.key", [real.addr])  # an old-style entry
    real.kill()
    impostor = Peer(tmp_path, "impostor").start(port=port)  # another identity, same address
    try:
        line = refused(make_mount("b", key=pinned, extra=FAST))
        assert "identity is not the expected one" in line and "--new" in line, line
        line = refused(make_mount("c", key=plain, extra=FAST))
        assert "1 of the 1 peers that answered say it has none, and 8 must" in line, line
    finally:
        impostor.kill()
        real.start(port=port)
    assert roots(peers, backup.owner) == backup.roots  # nothing replaced the real root
    d = make_mount("d", key=backup.keyfile, extra=FAST)  # the user's own keyfile still works
    d.mount()
    for name, data in FILES.items():
        assert (d.path / name).read_bytes() == data
    d.unmount()


def test_one_honest_but_empty_peer_is_not_a_quorum_and_new_overrides_it(
    make_mount, tmp_path: Path
) -> None:
    lonely = Peer(tmp_path, "lonely").start()  # a real peer that has never heard of us
    try:
        extra = [*FAST, "--peer", f"{lonely.peer_id}@{lonely.addr}"]
        m = make_mount("m", extra=extra)  # the conftest keyfile, used nowhere yet
        line = refused(m)
        assert "1 of the 1 peers that answered say it has none, and 8 must" in line, line
        assert "--new" in line
        m.mount("--new")  # deliberately a new backup
        (m.path / "first.txt").write_text("new backup\n")
        m.unmount()
        m.mount()  # no longer fresh: no quorum needed
        assert (m.path / "first.txt").read_text() == "new backup\n"
        m.unmount()
    finally:
        lonely.kill()


def test_a_keyfile_made_for_this_state_directory_needs_no_quorum(
    make_mount, tmp_path: Path
) -> None:
    lonely = Peer(tmp_path, "lonely").start()
    try:
        extra = [*FAST, "--peer", lonely.addr]
        # `fluidfs init` for the state directory the first mount uses
        key = tmp_path / "init.key"
        made = run_cli("init", "--keyfile", str(key), "--state-dir", str(tmp_path / "i-state"))
        assert made.returncode == 0, made.stderr
        inited = make_mount("i", key=key, extra=extra)
        inited.mount()
        inited.unmount()
        # the README's first command: the mount creates the keyfile itself
        auto = make_mount("auto", extra=extra)
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
        result = run_cli("mount", str(auto.path), "--state-dir", str(auto.state), *extra,
                         env=env)
        assert result.returncode == 0, result.stderr + auto.log()
        assert "created a new keyfile" in result.stderr
        auto.pids.append(auto.pid())
        assert is_mounted(auto.path)
        auto.unmount()
    finally:
        lonely.kill()


def test_keyfile_peer_entries_carry_the_id_and_old_entries_still_read(tmp_path: Path) -> None:
    peer = keys.KeyRing(keys.generate())
    pinned, plain = f"{peer.peer_id}@127.0.0.1:7470", "example.org:7470"
    path = tmp_path / "k"
    keys.write_keyfile(path, keys.with_peers(keys.generate(), [pinned, plain]))
    loaded = keys.read_keyfile(path)
    assert loaded.peers == (pinned, plain)
    assert [(e.addr, e.key) for e in loaded.bootstrap()] == [
        ("127.0.0.1:7470", peer.public_key), ("example.org:7470", None)]
    for bad in ("nope@127.0.0.1:7470", "127.0.0.1", "host:0", "host:99999", "@host:1"):
        with pytest.raises(ValueError):
            keys.parse_peer(bad)
        with pytest.raises(keys.KeyfileError, match="bad peer"):
            keys.loads(keys.dumps(keys.Keyfile(os.urandom(32), peers=(bad,))))
