"""Relays (issue 12 item 3) in the network lab: two homes behind NATs without UPnP, which
can never dial each other, meet and keep an agreement through a public relay. Real
`fluidfs serve` and `fluidfs mount` processes in their own namespaces (tests/netlab.py),
driven by the real command line over their control sockets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from labnodes import PORT, LabMount, LabPeer, cli, peers_json
from netlab import Host, Lab, lab_fixture  # noqa: F401 - the lab fixture
from peerhelpers import status, wait_for

from fluidfs import keys

QUICK = ["--reach-interval", "1", "--audit-interval", "1", "--tolerance", "600"]


@pytest.fixture
def pair_keyfile(tmp_path: Path) -> Path:
    """Two shards per block, one needed: full redundancy takes both peers."""
    path = tmp_path / "pair.key"
    keys.write_keyfile(path, keys.generate(shards_total=2, shards_needed=1))
    return path


def met_through_relay(lab: Lab, tmp_path: Path, keyfile: Path, make_mount,
                      relay_host: Host | None = None, relay_entry: str | None = None
                      ) -> tuple[LabPeer, LabPeer, LabMount]:
    """A public relay (on *relay_host*), a friend behind a NAT without UPnP registered
    at it (given *relay_entry* with --relay-via; else it knows the relay as a peer and
    learns that it relays), and a mount behind another such NAT that met the friend by
    its invite code: (relay, friend, mount)."""
    relay = LabPeer(relay_host or lab.public("relay"), tmp_path, [*QUICK, "--relay"]).start()
    via = relay_entry or relay.addr
    told = ["--relay-via", via] if relay_entry else ["--peer", relay.addr]
    friend = LabPeer(lab.home("hf").host("pf"), tmp_path, [*QUICK, "--no-upnp", *told]).start()

    def invite() -> str | None:
        result = cli("invite", "--state-dir", str(friend.state))
        if result.returncode == 0 and f"via relay {via}" in result.stderr:
            return result.stdout.strip()
        return None

    code = wait_for(invite, 60, "an invite naming the relay")

    mnt = make_mount("m", key=keyfile,
                     extra=["--new", "--donate", "256M", "--block-size", "256K", "--no-upnp",
                            "--peer", relay.addr, *QUICK])
    mnt.__class__ = LabMount
    mnt.host = lab.home("hm").host("pm")
    mnt.mount()
    added = cli("peers", "add", code, "--state-dir", str(mnt.state))
    assert added.returncode == 0, added.stderr + mnt.log()
    assert f"added peer {friend.peer_id} at via relay {via}: agreement made" \
        in added.stdout, added.stdout
    return relay, friend, mnt


def settled(mnt: LabMount) -> dict | None:
    s = status(mnt.state)
    return s if s["unsealed_bytes"] == 0 and s["under_replicated"] == 0 \
        and s["blocks"] == 2 and s["redundancy"] == {"2": 2} else None


def test_a_mount_behind_a_nat_stores_to_and_audits_a_natted_peer_through_a_relay(
    lab: Lab, tmp_path: Path, pair_keyfile: Path, make_mount
) -> None:
    """A friend behind a NAT without UPnP, which knows a public relay only as a peer,
    finds that nobody can dial it, registers at the relay and its invite names it; a
    mount behind another NAT without UPnP adds the code, makes an agreement with the
    friend through the relay, places shards on it and audits them.
    (Before relays neither could reach the other: the friend's invite had no address.)"""
    _, friend, mnt = met_through_relay(lab, tmp_path, pair_keyfile, make_mount)
    me = status(mnt.state)["peer_id"]
    row = next(r for r in peers_json(mnt.state) if r["id"] == friend.peer_id)
    assert row["active"] and not row["addr"], row  # known by id alone, reached by relay

    (mnt.path / "data.bin").write_bytes(os.urandom(512 * 1024))
    os.sync()
    wait_for(lambda: settled(mnt), 120, "both blocks on both peers")
    assert friend.hosted_for(me) > 0, "nothing reached the friend behind the NAT"
    challenges = status(mnt.state)["audit_challenges"]
    wait_for(lambda: status(mnt.state)["audit_challenges"] >= challenges + 4, 60,
             "audits of both peers")
    s = status(mnt.state)
    assert s["repaired_bytes"] == 0 and s["redundancy"] == {"2": 2}, s
    row = next(r for r in peers_json(mnt.state) if r["id"] == friend.peer_id)
    assert row["active"], row


def test_the_relay_forwards_no_plaintext_and_no_key_of_a_known_file(
    lab: Lab, tmp_path: Path, pair_keyfile: Path, make_mount
) -> None:
    """A recorder in front of the relay's port (in the relay's own namespace) keeps every
    byte the relay forwards to and from the friend — registration, call-backs and the
    relayed connection. A known file's shards cross it, yet no 32 bytes of the file, of
    the keyfile's root secret or of either node's identity key appear in what it saw."""
    relay_host = lab.public("relay")
    tap = tmp_path / "relay-tap.bin"
    relay_host.popen([sys.executable, str(Path(__file__).with_name("relaytap.py")),
                      relay_host.ip, str(PORT + 1), "127.0.0.1", str(PORT), str(tap)])
    wait_for(lambda: Path(f"{tap}.ready").exists(), 30, "the recorder listening")
    _, friend, mnt = met_through_relay(lab, tmp_path, pair_keyfile, make_mount,
                                       relay_host, f"{relay_host.ip}:{PORT + 1}")
    known = os.urandom(512 * 1024)
    (mnt.path / "known.bin").write_bytes(known)
    os.sync()
    wait_for(lambda: settled(mnt), 120, "both blocks on both peers")
    me = status(mnt.state)["peer_id"]
    assert friend.hosted_for(me) >= len(known)  # the file's shards went through the tap
    seen = tap.read_bytes()
    assert len(seen) >= len(known), len(seen)
    secrets = {
        "the file": known,
        "the keyfile's root secret": keys.read_keyfile(pair_keyfile).root,
        "the mount's identity key": bytes(keys.KeyRing(keys.read_keyfile(pair_keyfile))
                                          .signing_key),
        "the friend's identity key": bytes(keys.KeyRing(keys.read_keyfile(friend.keyfile))
                                           .signing_key),
    }
    for what, secret in secrets.items():
        for at in range(0, len(secret) - 31, 1024):
            assert secret[at:at + 32] not in seen, f"the relay forwarded {what} in clear"
