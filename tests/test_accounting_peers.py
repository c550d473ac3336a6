"""Honest accounting with real peers (issue 19): after failed StoreShard calls and a clean
unmount and remount, what the mount thinks each peer holds for it is what the peer holds.

Before, the failed stores stayed in the placing journal; the remount turned them into
garbage and subtracted their bytes from peers' usage while the peers still held the
shards that were stored.
"""

from __future__ import annotations

import json
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


def they_use(state: Path) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-m", "fluidfs", "peers", "--json",
                             "--state-dir", str(state)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return {row["id"]: row["they_use"] for row in json.loads(result.stdout)["peers"]}


def test_usage_matches_the_hosts_after_failed_stores_and_a_remount(make_mount, peers):
    flaky = peers[:4]
    for peer in flaky:  # these refuse half of the shard requests
        peer.kill()
        peer.extra += ["--fault-rate", "0.5"]
        peer.start()
    args = ["--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "24G"]
    for peer in peers:
        args += ["--peer", peer.addr]
    mnt = make_mount("m", extra=args)
    mnt.mount()
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == len(peers), 60,
             "agreements with every peer")
    me = status(mnt.state)["peer_id"]
    (mnt.path / "f").write_bytes(os.urandom(24 * BLOCK))
    wait_for(lambda: status(mnt.state)["redundancy"] == {"12": 24}, 90, "full redundancy")
    assert "injected fault" in (mnt.state / "fluidfs.log").read_text(), "stores failed"
    mnt.unmount()
    mnt.mount()

    def settled() -> bool:
        s = status(mnt.state)
        return s["gc_pending_bytes"] == 0 and s["upload_pending_bytes"] == 0

    wait_for(settled, 60, "nothing left to delete or upload")
    ours = they_use(mnt.state)
    held = {p.peer_id: p.hosted_for(me) for p in peers}
    assert sum(held.values()) > 0
    assert {k: ours.get(k, 0) for k in held} == held
