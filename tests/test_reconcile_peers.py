"""Reconciliation with real peers (issue 19): a peer that was killed, lost its agreement,
came back and was re-agreed keeps nothing of data the owner deleted and forgot.

Before reconciliation its shards stayed in its store indefinitely: the owner had forgotten
that holder when the agreement ended, so no delete ever reached it, and the new
agreement kept the host's keep-period drop from running.
"""

from __future__ import annotations

import os

from peerhelpers import mount_with_peers, peer_rows, status, wait_for

BLOCK = 256 * 1024


def test_deleted_data_leaves_nothing_on_a_peer_killed_restarted_and_re_agreed(
    make_mount, peer_cluster
):
    peers = peer_cluster(14)
    mnt = mount_with_peers(make_mount, peers, "--audit-interval", "1", "--tolerance", "3",
                           "--keep-shards", "3", "--commit-quiet", "3600")
    me = status(mnt.state)["peer_id"]
    (mnt.path / "f").write_bytes(os.urandom(16 * BLOCK))
    wait_for(lambda: status(mnt.state)["redundancy"] == {"12": 16}, 60, "full redundancy")
    victim = next(p for p in peers if p.hosted_for(me) > 0)
    others = [p for p in peers if p is not victim]
    victim.kill()
    wait_for(lambda: not peer_rows(mnt.state)[victim.peer_id]["active"], 60,
             "the victim's agreement to end")
    wait_for(lambda: status(mnt.state)["redundancy"] == {"12": 16}, 90,
             "every block back at 12/12 without the victim")
    (mnt.path / "f").unlink()
    wait_for(lambda: sum(p.hosted_for(me) for p in others) == 0, 60,
             "the other peers to drop every shard")
    victim.start()  # it still keeps the shards of the deleted file
    wait_for(lambda: peer_rows(mnt.state).get(victim.peer_id, {}).get("active"), 120,
             "a new agreement with the victim")
    wait_for(lambda: victim.hosted_for(me) == 0, 60,
             "the victim to keep nothing of the deleted file")
    row = peer_rows(mnt.state)[victim.peer_id]
    assert row["active"] and row["they_use"] == 0
    log = (mnt.state / "fluidfs.log").read_text()
    assert "shards of ours that we no longer reference: deleted" in log
