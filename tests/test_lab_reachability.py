"""Real networks (issue 12): peers whose address changes, in the network lab.

Every node is a real process in its own network namespace (tests/netlab.py,
tests/labnodes.py); the mount is a real FUSE mount.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from labnodes import PORT, LabMount, LabPeer, peers_json, start_all
from netlab import Lab, lab_fixture  # noqa: F401 - the lab fixture
from peerhelpers import status, wait_for

from fluidfs import keys

QUICK = ["--reach-interval", "1", "--audit-interval", "1", "--tolerance", "600"]


def settled(state: Path, blocks: int, total: int) -> dict | None:
    s = status(state)
    if s["unsealed_bytes"] == 0 and s["under_replicated"] == 0 and s["blocks"] == blocks \
            and s["redundancy"] == {str(total): blocks}:
        return s
    return None


@pytest.fixture
def small_keyfile(tmp_path: Path) -> Path:
    """A keyfile for 4 shards per block, 2 needed: four peers give full redundancy."""
    path = tmp_path / "small.key"
    keys.write_keyfile(path, keys.generate(shards_total=4, shards_needed=2))
    return path


def row(state: Path, peer_id: str) -> dict:
    return next(r for r in peers_json(state) if r["id"] == peer_id)


def test_a_peer_whose_address_changes_keeps_its_agreement_and_gets_new_shards(
    lab: Lab, tmp_path: Path, small_keyfile: Path, make_mount
) -> None:
    """A peer's namespace gets a new address mid-run: it notices, signs a new address
    record and tells its partners; the mount moves its row, keeps the agreement and the
    peer's trust, counts none of its shards lost, and new shards reach it at the new
    address. (Before address records the mount kept dialling the old address until the
    agreement ended after the tolerance, and new shards went elsewhere.)"""
    peers = start_all([LabPeer(lab.public(f"p{i}"), tmp_path, list(QUICK)) for i in range(4)])
    host = lab.public("m")
    extra = ["--block-size", "256K", "--listen", f"0.0.0.0:{PORT}", "--donate", "256M", *QUICK]
    for peer in peers:
        extra += ["--peer", peer.addr]
    mnt = make_mount("m", key=small_keyfile, extra=extra)
    mnt.__class__ = LabMount
    mnt.host = host
    mnt.mount()
    me = status(mnt.state)["peer_id"]
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == 4, 60, "4 agreements")
    (mnt.path / "first.bin").write_bytes(os.urandom(512 * 1024))
    os.sync()
    wait_for(lambda: settled(mnt.state, 2, 4), 90, "the first file fully placed")

    mover = peers[3]
    before = row(mnt.state, mover.peer_id)
    hosted_before = mover.hosted_for(me)
    assert before["addr"] == mover.addr and before["active"] and hosted_before > 0
    wait_for(lambda: any(r["id"] == me and r["addr"] for r in peers_json(mover.state)), 60,
             "the peer to know where the mount listens")
    old_addr = mover.addr
    mover.host.readdress("198.51.100.200")
    assert mover.addr != old_addr
    wait_for(lambda: row(mnt.state, mover.peer_id)["addr"] == mover.addr, 60,
             "the mount to learn the peer's new address")

    (mnt.path / "second.bin").write_bytes(os.urandom(512 * 1024))
    os.sync()
    s = wait_for(lambda: settled(mnt.state, 4, 4), 90, "the second file fully placed")
    after = row(mnt.state, mover.peer_id)
    assert after["active"], "the agreement ended"
    assert after["trust"] > 0.1, after
    assert s["repaired_bytes"] == 0 and s["repair_queue"] == 0, s
    assert mover.hosted_for(me) > hosted_before, "no new shard reached the moved peer"


def test_a_peer_behind_a_upnp_router_is_mapped_announced_and_dialled(
    lab: Lab, tmp_path: Path
) -> None:
    """A peer behind a NAT router with UPnP asks it to forward its port, announces the
    router's address and that port in its record, and a public peer dials it there (the
    handshake of discovery's verification proves it); at exit the mapping is removed.
    (Before, a peer behind NAT was never dialled: peers only knew its private address.)"""
    public = LabPeer(lab.public("pub"), tmp_path, list(QUICK)).start()
    home = lab.home("home", upnp=True)
    behind = LabPeer(home.host("pc"), tmp_path, [*QUICK, "--peer", public.addr]).start()
    mapped = f"{home.public_ip}:{PORT}"

    def public_row() -> dict | None:
        rows = [r for r in peers_json(public.state) if r["id"] == behind.peer_id]
        return rows[0] if rows and rows[0]["addr"] == mapped else None

    wait_for(public_row, 60, f"the public peer to know the home peer at {mapped}")
    assert f"dport {PORT}" in home.router.run("nft", "list", "chain", "inet", "filter",
                                              "prerouting_miniupnpd")
    # the public peer reached it through the mapping: its verification dial succeeded
    assert public_row()["last_seen"] > 0
    behind.proc.terminate()
    behind.proc.wait(timeout=30)
    rules = home.router.run("nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd")
    assert f"dport {PORT}" not in rules, rules
