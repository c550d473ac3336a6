"""Relays (issue 12 item 3) in the network lab: two homes behind NATs without UPnP, which
can never dial each other, meet and keep an agreement through a public relay. Real
`fluidfs serve` and `fluidfs mount` processes in their own namespaces (tests/netlab.py),
driven by the real command line over their control sockets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from labnodes import LabMount, LabPeer, cli, peers_json
from netlab import Lab, lab_fixture  # noqa: F401 - the lab fixture
from peerhelpers import status, wait_for

from fluidfs import keys

QUICK = ["--reach-interval", "1", "--audit-interval", "1", "--tolerance", "600"]


@pytest.fixture
def pair_keyfile(tmp_path: Path) -> Path:
    """Two shards per block, one needed: full redundancy takes both peers."""
    path = tmp_path / "pair.key"
    keys.write_keyfile(path, keys.generate(shards_total=2, shards_needed=1))
    return path


def test_a_mount_behind_a_nat_stores_to_and_audits_a_natted_peer_through_a_relay(
    lab: Lab, tmp_path: Path, pair_keyfile: Path, make_mount
) -> None:
    """A friend behind a NAT without UPnP keeps a registration at a public relay and its
    invite names the relay; a mount behind another NAT without UPnP adds the code, makes
    an agreement with the friend through the relay, places shards on it and audits them.
    (Before relays neither could reach the other: the friend's invite had no address.)"""
    relay = LabPeer(lab.public("relay"), tmp_path, [*QUICK, "--relay"]).start()
    friend = LabPeer(lab.home("hf").host("pf"), tmp_path,
                     [*QUICK, "--no-upnp", "--relay-via", relay.addr]).start()

    def invite() -> str | None:
        result = cli("invite", "--state-dir", str(friend.state))
        if result.returncode == 0 and f"via relay {relay.addr}" in result.stderr:
            return result.stdout.strip()
        return None

    code = wait_for(invite, 60, "an invite naming the relay")

    mnt = make_mount("m", key=pair_keyfile,
                     extra=["--new", "--donate", "256M", "--block-size", "256K", "--no-upnp",
                            "--peer", relay.addr, *QUICK])
    mnt.__class__ = LabMount
    mnt.host = lab.home("hm").host("pm")
    mnt.mount()
    added = cli("peers", "add", code, "--state-dir", str(mnt.state))
    assert added.returncode == 0, added.stderr + mnt.log()
    assert f"added peer {friend.peer_id} at via relay {relay.addr}: agreement made" \
        in added.stdout, added.stdout
    me = status(mnt.state)["peer_id"]
    row = next(r for r in peers_json(mnt.state) if r["id"] == friend.peer_id)
    assert row["active"] and not row["addr"], row  # known by id alone, reached by relay

    (mnt.path / "data.bin").write_bytes(os.urandom(512 * 1024))
    os.sync()

    def settled() -> dict | None:
        s = status(mnt.state)
        return s if s["unsealed_bytes"] == 0 and s["under_replicated"] == 0 \
            and s["blocks"] == 2 and s["redundancy"] == {"2": 2} else None

    wait_for(settled, 120, "both blocks on both peers")
    assert friend.hosted_for(me) > 0, "nothing reached the friend behind the NAT"
    challenges = status(mnt.state)["audit_challenges"]
    wait_for(lambda: status(mnt.state)["audit_challenges"] >= challenges + 4, 60,
             "audits of both peers")
    s = status(mnt.state)
    assert s["repaired_bytes"] == 0 and s["redundancy"] == {"2": 2}, s
    row = next(r for r in peers_json(mnt.state) if r["id"] == friend.peer_id)
    assert row["active"], row
