"""Meeting a friend by invite code across NATs (issue 12), in the network lab: real
`fluidfs serve` and `fluidfs mount` processes in their own namespaces, driven by the real
command line (`fluidfs invite`, `fluidfs peers add CODE`) over their control sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
from labnodes import PORT, LabMount, LabPeer, cli, peers_json
from netlab import Lab, lab_fixture  # noqa: F401 - the lab fixture
from peerhelpers import status, wait_for

from fluidfs import keys
from fluidfs.peers.address import PeerAddr
from fluidfs.peers.addrrecord import make_record
from fluidfs.peers.invite import invite_code

QUICK = ["--reach-interval", "1", "--audit-interval", "1", "--tolerance", "600"]


@pytest.fixture
def small_keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "small.key"
    keys.write_keyfile(path, keys.generate(shards_total=4, shards_needed=2))
    return path


def test_two_homes_meet_by_invite_code_and_an_impostor_is_refused(
    lab: Lab, tmp_path: Path, small_keyfile: Path, make_mount
) -> None:
    """A friend's node behind a UPnP router prints an invite naming the mapping its
    router granted; a mount behind a NAT without UPnP adds the code and forms an
    agreement with it. A code naming another id at the same address is refused, and the
    mount learns nobody from it."""
    upnp_home = lab.home("ha", upnp=True)
    friend = LabPeer(upnp_home.host("pa"), tmp_path, list(QUICK)).start()
    mapped = f"{upnp_home.public_ip}:{PORT}"

    def invite() -> str | None:
        result = cli("invite", "--state-dir", str(friend.state))
        return result.stdout.strip() if result.returncode == 0 and mapped in result.stderr \
            else None

    code = wait_for(invite, 60, f"an invite naming the mapping {mapped}")
    assert code.startswith("ffi1-") and "\n" not in code

    nat_home = lab.home("hb")
    mnt = make_mount("m", key=small_keyfile, extra=["--new", "--donate", "256M", *QUICK])
    mnt.__class__ = LabMount
    mnt.host = nat_home.host("pb")
    mnt.mount()

    impostor = keys.KeyRing(keys.generate())
    fake = invite_code(make_record(impostor.signing_key, [PeerAddr.parse(mapped)]))
    refused = cli("peers", "add", fake, "--state-dir", str(mnt.state))
    assert refused.returncode == 1, refused.stdout
    assert "identity is not the expected one" in refused.stderr, refused.stderr
    assert peers_json(mnt.state) == [], "the mount learnt someone from a refused code"

    added = cli("peers", "add", code, "--state-dir", str(mnt.state))
    assert added.returncode == 0, added.stderr
    assert f"added peer {friend.peer_id} at {mapped}: agreement made" in added.stdout
    (row,) = peers_json(mnt.state)
    assert (row["id"], row["addr"], row["active"]) == (friend.peer_id, mapped, True)
    me = status(mnt.state)["peer_id"]
    wait_for(lambda: any(r["id"] == me and r["active"] for r in peers_json(friend.state)),
             30, "the friend's side of the agreement")
