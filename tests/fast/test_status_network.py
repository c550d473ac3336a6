"""`fluidfs status` shows the node's traffic with its peers: send and receive rates, the
limits, and when the uploads will be done (node/traffic.py, cli/inspect.py).

A real ``Node`` runs its services in this trio run with a 256 KiB/s upload limit; a real
peer (inproc.PeerNode) stores a shard on it and reads it back over 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
from inproc import PeerNode

from fluidfs import keys
from fluidfs.blocks import merkle
from fluidfs.cli.inspect import network_line
from fluidfs.net.bandwidth import Bandwidth
from fluidfs.node.node import Node, NodeConfig
from fluidfs.node.traffic import TrafficRate
from fluidfs.statedir import StateDir

KIB, MIB = 1 << 10, 1 << 20


async def test_status_shows_rates_limits_and_eta(tmp_path: Path) -> None:
    ring = keys.KeyRing(keys.generate())
    node = Node(NodeConfig(ring, StateDir(tmp_path / "state"), listen="127.0.0.1:0",
                           limit_upload=256 * KIB))
    peer = PeerNode(tmp_path / "peer")
    try:
        await node.start()
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run_services)
            await peer.start(nursery, listen=False)
            node.ledger.record(peer.key, we_host=64 * MIB, they_host=0, term=3600)
            peer.ledger.record(ring.public_key,
                               we_host=0, they_host=64 * MIB, term=3600)
            peer.peers.add(ring.public_key, node.conns.listen_addr)
            shard = os.urandom(200 * KIB)
            sid = merkle.shard_id(shard)
            started = trio.current_time()
            stored = await peer.conns.call(ring.public_key, "StoreShard",
                                           {"shards": [{"id": sid, "data": shard}]})
            assert stored["stored"] == [sid]
            back = await peer.conns.call(ring.public_key, "RetrieveShard", {"id": sid})
            assert back["data"] == shard
            await trio.sleep(max(0.0, started + 1.2 - trio.current_time()))  # one measure

            figures = await node.status.report()
            nursery.cancel_scope.cancel()
    finally:
        node.close()
        peer.close()

    assert figures["limit_upload"] == 256 * KIB and figures["limit_download"] is None
    assert figures["send_rate"] > 0 and figures["receive_rate"] > 0
    assert figures["send_rate"] <= 256 * KIB * 1.05
    assert figures["upload_eta"] == 0, "nothing of ours is pending"
    line = network_line(figures)
    assert line.startswith("sending ") and "of 256.0K/s" in line
    assert "receiving " in line and "(no limit)" in line and line.endswith("uploads done")


def test_upload_eta_is_what_is_pending_at_the_upload_rate() -> None:
    traffic = TrafficRate(Bandwidth.limits(None, 2 * MIB))
    assert traffic.figures(pending=10 * MIB, upload_rate=1 * MIB)["upload_eta"] == 10
    assert traffic.figures(pending=10 * MIB, upload_rate=0.0)["upload_eta"] is None
    figures = traffic.figures(pending=10 * MIB, upload_rate=1 * MIB)
    assert (figures["limit_upload"], figures["limit_download"]) == (None, 2 * MIB)
    line = network_line(figures)
    assert "sending 0B/s (no limit)" in line and "of 2.0M/s" in line
    assert line.endswith("upload ETA 10s")
    figures["upload_eta"] = None
    assert network_line(figures).endswith("upload ETA unknown (not moving)")
