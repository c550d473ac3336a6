"""Twelve peers on a mix of lines (issue 12's first lab test): 6 public, 4 behind NAT
routers with UPnP, 2 behind NAT routers without, a public relay, and the mount behind a
NAT without UPnP. The mount places every block on all 12, audits every one and fetches
every shard copy back from its holder. Real `fluidfs serve` and `fluidfs mount` processes,
each in its own network namespace (tests/netlab.py), driven over their control sockets.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from labnodes import PORT, LabMount, LabPeer, cli, peers_json, start_all
from netlab import Lab, lab_fixture  # noqa: F401 - the lab fixture
from peerhelpers import status, wait_for

from fluidfs import keys

pytestmark = [pytest.mark.mount, pytest.mark.network]

QUICK = ["--reach-interval", "1", "--audit-interval", "1", "--tolerance", "600"]
N, K = 12, 4
BLOCKS = 2
BLOCK = 256 * 1024


def invite_via_relay(peer: LabPeer, relay: LabPeer) -> str:
    """The invite code of a peer nobody can dial, once it names the relay."""

    def code() -> str | None:
        result = cli("invite", "--state-dir", str(peer.state))
        if result.returncode == 0 and f"via relay {relay.addr}" in result.stderr:
            return result.stdout.strip()
        return None

    return wait_for(code, 60, f"{peer.name}'s invite naming the relay")


def test_a_mount_behind_nat_reaches_twelve_peers_on_mixed_lines_and_audits_and_reads_all(
    lab: Lab, tmp_path: Path, make_mount
) -> None:
    """12/12 redundancy for a mount that nobody can dial, with 4 of its peers reachable only
    through their routers' UPnP mappings and 2 only through the relay; then every peer
    passes audits and `check --read-data` fetches and verifies every shard copy."""
    began = time.monotonic()
    keyfile = tmp_path / "mix.key"
    keys.write_keyfile(keyfile, keys.generate(shards_total=N, shards_needed=K))
    relay = LabPeer(lab.public("relay"), tmp_path, [*QUICK, "--relay", "--donate", "0"]).start()
    public = [LabPeer(lab.public(f"p{i}"), tmp_path, list(QUICK)) for i in range(6)]
    upnp = []
    for i in range(4):
        home = lab.home(f"hu{i}", upnp=True)
        peer = LabPeer(home.host(f"u{i}"), tmp_path, [*QUICK, "--peer", relay.addr])
        upnp.append((peer, f"{home.public_ip}:{PORT}"))
    hidden = [LabPeer(lab.home(f"hn{i}").host(f"n{i}"), tmp_path,
                      [*QUICK, "--no-upnp", "--peer", relay.addr]) for i in range(2)]
    start_all([*public, *(peer for peer, _ in upnp), *hidden])
    codes = [invite_via_relay(peer, relay) for peer in hidden]

    entries = [relay.addr, *(p.addr for p in public), *(addr for _, addr in upnp)]
    mnt = make_mount("m", key=keyfile,
                     extra=["--new", "--donate", "256M", "--block-size", "256K", "--no-upnp",
                            *QUICK, *[x for e in entries for x in ("--peer", e)]])
    mnt.__class__ = LabMount
    mnt.host = lab.home("hm").host("pm")
    mnt.mount()
    for code in codes:
        added = cli("peers", "add", code, "--state-dir", str(mnt.state))
        assert added.returncode == 0, added.stderr + mnt.log()
    peers = [*public, *(p for p, _ in upnp), *hidden]
    ids = {p.peer_id for p in peers}

    def agreed() -> bool:
        rows = peers_json(mnt.state)
        return ids <= {r["id"] for r in rows if r["active"] and r["they_host"] > 0}

    wait_for(agreed, 60, "agreements with all 12 storing peers")

    (mnt.path / "data.bin").write_bytes(os.urandom(BLOCKS * BLOCK))
    os.sync()

    def settled() -> dict | None:
        s = status(mnt.state)
        return s if s["unsealed_bytes"] == 0 and s["under_replicated"] == 0 \
            and s["blocks"] == BLOCKS and s["redundancy"] == {str(N): BLOCKS} else None

    wait_for(settled, 90, f"every block on {N} peers")
    me = status(mnt.state)["peer_id"]
    for peer in peers:
        assert peer.hosted_for(me) >= BLOCKS * BLOCK // K, f"{peer.name} holds too little"

    def audited() -> bool:
        rows = {r["id"]: r for r in peers_json(mnt.state)}
        return all(rows[i]["audits_passed"] > 0 for i in ids)

    wait_for(audited, 60, "an audit of every peer passed")
    rows = {r["id"]: r for r in peers_json(mnt.state)}
    assert all(rows[i]["audits_failed"] == 0 and rows[i]["active"] for i in ids), rows
    for peer, mapped in upnp:  # dialled at its router's UPnP mapping
        assert rows[peer.peer_id]["addr"] == mapped, rows[peer.peer_id]
    for peer in hidden:  # known by id alone, reached through the relay
        assert not rows[peer.peer_id]["addr"], rows[peer.peer_id]
    checked = cli("check", "--read-data", "--state-dir", str(mnt.state), timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "0 bad shard copies" in checked.stdout, checked.stdout
    s = status(mnt.state)
    assert s["repaired_bytes"] == 0 and s["redundancy"] == {str(N): BLOCKS}, json.dumps(s)
    print(f"12-peer NAT mix: {time.monotonic() - began:.1f} s")
