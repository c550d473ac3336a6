"""Truthful health during an outage (issue 19): holders killed with SIGKILL still count
as agreed holders until their tolerance ends, but the redundancy xattr and `fluidfs
status` show at once that fewer shards are reachable, and which holders fail since when.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from peerhelpers import running_peers, status, wait_for

BLOCK = 256 * 1024


@pytest.fixture
def peers(tmp_path: Path):
    with running_peers(tmp_path, 14) as made:
        yield made


def xattr(path: Path) -> str:
    return os.getxattr(path, "user.fluidfs.redundancy").decode()


def test_an_outage_of_two_holders_shows_ten_reachable_before_the_tolerance_ends(
    make_mount, peers
):
    """Before this change the xattr said "12/12" throughout the outage."""
    args = ["--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "24G",
            "--audit-interval", "1", "--tolerance", "3600"]
    for peer in peers:
        args += ["--peer", peer.addr]
    mnt = make_mount("m", extra=args)
    mnt.mount()
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == len(peers), 60,
             "agreements with every peer")
    me = status(mnt.state)["peer_id"]
    (mnt.path / "f").write_bytes(os.urandom(8 * BLOCK))
    wait_for(lambda: status(mnt.state)["redundancy"] == {"12": 8}, 60, "full redundancy")
    assert xattr(mnt.path / "f") == "12/12"
    dead = [p for p in peers if p.hosted_for(me) > 0][:2]
    for peer in dead:
        peer.kill()
    wait_for(lambda: xattr(mnt.path / "f") == "12/12 (10 reachable)", 30,
             "the xattr to show 10 reachable")
    s = status(mnt.state)
    assert s["redundancy"] == {"12": 8}, "agreed holders count until the tolerance ends"
    assert min(int(level) for level in s["reachable"]) == 10
    assert {p["id"] for p in s["peers_failing"]} == {p.peer_id for p in dead}
    text = subprocess.run([sys.executable, "-m", "fluidfs", "status", "--state-dir",
                           str(mnt.state)], capture_output=True, text=True, timeout=60)
    assert "failing:     2 holders" in text.stdout
    for peer in dead:
        assert peer.peer_id[:18] in text.stdout
    assert " 10/12" in text.stdout.split("reachable:")[1]
