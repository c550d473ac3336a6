"""One hung peer pauses nobody's audits (issue 19), with real `fluidfs serve` peers.

A holder stopped with SIGSTOP accepts connections (the kernel does) but never answers.
Before issue 19 an audit cycle waited for every holder, so the other peers' audit counts
froze for the audit timeout (20 s) at every cycle; now each holder is audited on its own.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from peerhelpers import mount_with_peers, peer_rows, status, wait_for

BLOCK = 256 * 1024


def passed_by_peer(state: Path) -> dict[str, int]:
    return {key: row["audits_passed"] for key, row in peer_rows(state).items()}


def test_a_stopped_peer_does_not_slow_the_others_audits(make_mount, peer_cluster):
    peers = peer_cluster(12)
    mnt = mount_with_peers(make_mount, peers, "--audit-interval", "1", "--tolerance", "600")
    (mnt.path / "f").write_bytes(os.urandom(4 * BLOCK))
    wait_for(lambda: status(mnt.state)["redundancy"] == {"12": 4}, 60, "full redundancy")
    hung, others = peers[0], peers[1:]
    os.kill(hung.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(2)  # the audit under way when it stopped may still finish
        before = passed_by_peer(mnt.state)
        time.sleep(10)  # half the audit timeout: a cycle waiting for it would not end
        after = passed_by_peer(mnt.state)
        rises = {p.peer_id[:12]: after[p.peer_id] - before[p.peer_id] for p in others}
        # Two challenges a cycle, a cycle a second: about 20 each; ask for a quarter.
        assert min(rises.values()) >= 5, rises
        assert after[hung.peer_id] == before[hung.peer_id]
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
