"""`fluidfs sync` costs in proportion to the change (issue 16): a real mount, 12 real
`fluidfs serve` peers on 127.0.0.1, a sync after a handful of small files."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import run_cli
from mounthelpers import spent
from peerhelpers import running_peers, status, wait_for

pytestmark = [pytest.mark.mount, pytest.mark.network]

ROUNDS = 10


def test_sync_after_three_small_files_is_quick(make_mount, tmp_path) -> None:
    """Each sync writes three metadata nodes (the root directory, the snapshot list, the
    commit) and one root record; none of it may wait on a polling interval. The best of a
    few rounds is compared, so a busy machine's worst moments do not decide, and the
    command's wall time is taken beyond a `fluidfs status` run just before it (the same
    interpreter start-up and control round trip, on the machine as loaded right then).
    The node's own part is taken less the time the node waited for a CPU during the sync,
    and the longest any one peer did (placement asks them all at once): time spent queued
    behind other processes, not waiting on a timer of ours."""
    with running_peers(tmp_path / "peers", 12) as peers:
        # No commit of the mount's own (after a quiet spell) takes the notes before the
        # sync does: on a loaded machine one did, and the sync had nothing to commit.
        extra = ["--listen", "127.0.0.1:0", "--donate", "2G", "--commit-quiet", "3600"]
        mnt = make_mount(extra=[*extra, *(a for p in peers for a in ("--peer", p.addr))])
        mnt.mount()
        wait_for(lambda: status(mnt.state)["peers_with_agreements"] == 12, 60, "agreements")
        (mnt.path / "first").write_bytes(b"x")
        assert run_cli("sync", "--state-dir", str(mnt.state)).returncode == 0, mnt.log()

        node = mnt.pid()
        assert node is not None
        walls, baselines, node_seconds, queued = [], [], [], []
        for r in range(ROUNDS):
            started = time.monotonic()
            assert run_cli("status", "--json", "--state-dir", str(mnt.state)).returncode == 0
            baselines.append(time.monotonic() - started)
            for i in range(3):
                (mnt.path / f"note-{r}-{i}.txt").write_bytes(os.urandom(200))
            started = time.monotonic()
            node_before = spent(node)
            peers_before = [spent(p.proc.pid) for p in peers]
            result = run_cli("sync", "--json", "--state-dir", str(mnt.state))
            walls.append(time.monotonic() - started)
            queued.append((spent(node) - node_before).run_delay + max(
                (spent(p.proc.pid) - b).run_delay for p, b in zip(peers, peers_before,
                                                                   strict=True)))
            assert result.returncode == 0, result.stderr + mnt.log()
            reply = json.loads(result.stdout)
            assert reply["committed"] and reply["full"] and reply["published"], reply
            # the changed directory, its path and the commit nodes; a holder to record may
            # add one (incremental commits, fs/dirstate.py)
            assert 3 <= reply["nodes_written"] <= 6, reply
            node_seconds.append(reply["seconds"])
        mnt.unmount()

    # Bounds with room for a loaded CI machine: the best run on 127.0.0.1 is ~0.3 s for
    # the command and 0.08-0.15 s for the node's part (placing the changed metadata nodes
    # and one root record); polling 50 ms per node's placement cost 0.2 s and more.
    beyond = [wall - base for wall, base in zip(walls, baselines, strict=True)]
    assert min(beyond) < 1.2, f"`fluidfs sync` took {walls} s, `fluidfs status` {baselines} s"
    working = [max(0.0, took - wait) for took, wait in zip(node_seconds, queued, strict=True)]
    print(f"sync wall {walls}, status wall {baselines}, node's part {node_seconds}, "
          f"queued for a CPU {queued}")
    assert min(working) < 0.3, (
        f"the node's part of the syncs took {node_seconds} s, {queued} s of it queued for a CPU")
