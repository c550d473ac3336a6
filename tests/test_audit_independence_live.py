"""One hung peer pauses nobody's audits (issue 19), with real `fluidfs serve` peers.

A holder stopped with SIGSTOP accepts connections (the kernel does) but never answers.
Before issue 19 an audit cycle waited for every holder, so the other peers' audit counts
froze for the audit timeout (20 s) at every cycle; now each holder is audited on its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peerhelpers import running_peers, status, wait_for

BLOCK = 256 * 1024


@pytest.fixture
def peers(tmp_path: Path):
    with running_peers(tmp_path, 12) as made:
        yield made


def passed_by_peer(state: Path) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-m", "fluidfs", "peers", "--json",
                             "--state-dir", str(state)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return {row["id"]: row["audits_passed"] for row in json.loads(result.stdout)["peers"]}


def test_a_stopped_peer_does_not_slow_the_others_audits(make_mount, peers):
    args = ["--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "24G",
            "--audit-interval", "1", "--tolerance", "600"]
    for peer in peers:
        args += ["--peer", peer.addr]
    mnt = make_mount("m", extra=args)
    mnt.mount()
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == len(peers), 60,
             "agreements with every peer")
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
