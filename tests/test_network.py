"""Shards leave the machine: 12 real `fluidfs serve` peers and one real mount on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from mounthelpers import spent
from peerhelpers import Peer, revive, running_peers, status, wait_for

from fluidfs.blocks.codec import default_version, shard_size_for

BLOCK = 256 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Twelve peers shared by the tests here: each test mounts with a keyfile of its
    own, so no test sees another's shards or agreements. All killed at the end."""
    with running_peers(tmp_path_factory.mktemp("peers"), 12) as made:
        yield made


@pytest.fixture
def peers(cluster: list[Peer]) -> list[Peer]:
    """The shared peers, each running as first started (``revive``)."""
    return revive(cluster)


def network_mount(make_mount, peers: list[Peer], name: str = "m"):
    args = ["--block-size", "256K", "--listen", "127.0.0.1:0"]
    for peer in peers:
        args += ["--peer", peer.addr]
    return make_mount(name, extra=args)


def settled(state: Path, blocks: int) -> dict | None:
    """Status once every block is sealed and fully placed, else None."""
    s = status(state)
    if s["unsealed_bytes"] == 0 and s["under_replicated"] == 0 and s["blocks"] == blocks:
        return s
    return None


def write_files(root: Path) -> dict[str, bytes]:
    files = {"big.bin": os.urandom(3 * 1024 * 1024), "mid.bin": os.urandom(100 * 1024),
             "tiny.txt": b"inline\n"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def expected_hosting(files: dict[str, bytes]) -> int:
    total = 0
    for data in files.values():
        if len(data) <= 4096:
            continue  # stored inline in metadata
        for start in range(0, len(data), BLOCK):
            total += shard_size_for(len(data[start : start + BLOCK]), 8, default_version())
    return total


def drop_cache_and_remount(mnt) -> None:
    mnt.unmount()
    subprocess.run(["rm", "-rf", str(mnt.state / "cache")], check=True)
    mnt.mount()


def test_each_block_has_one_shard_on_each_of_12_peers(make_mount, peers):
    mnt = network_mount(make_mount, peers)
    mnt.mount()
    me = status(mnt.state)["peer_id"]
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == 12, 30, "12 agreements")
    files = write_files(mnt.path)
    blocks = 12 + 1
    s = wait_for(lambda: settled(mnt.state, blocks), 60, "all blocks placed")
    assert s["redundancy"] == {"12": blocks}
    expected = expected_hosting(files)
    hosted = [peer.hosted_for(me) for peer in peers]
    # Beside the data, a peer may hold a shard of a commit's metadata (a few KiB at most
    # here) once the mount has committed, which a loaded machine lets happen before this
    # reading: a data shard more or fewer is still a difference of a data shard or more.
    smallest = min(shard_size_for(len(data[start : start + BLOCK]), 8, default_version())
                   for data in files.values() if len(data) > 4096
                   for start in range(0, len(data), BLOCK))
    assert all(expected <= h < expected + smallest for h in hosted), (
        f"every peer holds exactly one shard of every block: {hosted}, {expected} of data")
    for peer in peers:  # the plaintext never reaches a peer
        shards = peer.state / "shards.lmdb" / "data.mdb"
        assert files["big.bin"][:4096] not in shards.read_bytes()


def test_reads_survive_four_dead_peers_and_fail_cleanly_past_that(make_mount, peers):
    mnt = network_mount(make_mount, peers)
    mnt.mount()
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == 12, 30, "12 agreements")
    files = write_files(mnt.path)
    wait_for(lambda: settled(mnt.state, 13), 60, "all blocks placed")
    for peer in peers[:4]:
        peer.kill()
    drop_cache_and_remount(mnt)
    for name, data in files.items():
        assert (mnt.path / name).read_bytes() == data, name

    drop_cache_and_remount(mnt)
    peers[4].kill()
    node = mnt.pid()
    assert node is not None
    started, before = time.monotonic(), spent(node, os.getpid())
    with pytest.raises(OSError) as info:
        (mnt.path / "big.bin").read_bytes()
    assert info.value.errno == 5  # EIO, not a hang
    # (less the time the node and this process sat waiting for a CPU: a loaded machine's)
    assert time.monotonic() - started - (spent(node, os.getpid()) - before).run_delay < 30
    assert (mnt.path / "tiny.txt").read_bytes() == files["tiny.txt"]  # the mount is still up
    assert "unrecoverable" in (mnt.state / "fluidfs.log").read_text()

    peers[4].start()  # back on its old port, with its shards
    data = wait_for(lambda: _try_read(mnt.path / "big.bin"), 30, "reads to work again")
    assert data == files["big.bin"]


def _try_read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def test_restarted_peer_keeps_agreements_and_shards(make_mount, peers):
    mnt = network_mount(make_mount, peers)
    mnt.mount()
    me = status(mnt.state)["peer_id"]
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == 12, 30, "12 agreements")
    files = write_files(mnt.path)
    wait_for(lambda: settled(mnt.state, 13), 60, "all blocks placed")
    before = peers[0].control("peers", "--json")
    peers[0].kill()
    peers[0].start()
    after = peers[0].control("peers", "--json")
    row = next(r for r in after["peers"] if r["id"] == me)
    assert row == next(r for r in before["peers"] if r["id"] == me) | {
        "last_seen": row["last_seen"]}
    assert row["we_use"] == expected_hosting(files) and row["we_host"] > 0
    for peer in peers[1:5]:  # 8 holders left, peer 0 among them: its shards must be used
        peer.kill()
    drop_cache_and_remount(mnt)
    assert (mnt.path / "big.bin").read_bytes() == files["big.bin"]
