"""`serve --relay` bounds as options (`--relay-max-peers`, `--relay-max-connections`,
`--relay-limit`), and `fluidfs status` showing what the relay spends against them.

The options are parsed by the real CLI parser and the resulting policy runs a real
relay between in-process nodes on 127.0.0.1 (test_relay.py's lab); the status figures
come from a real ``Node`` that relays.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import pytest
import trio
from inproc import PeerNode, until
from test_relay import lab

from fluidfs import keys
from fluidfs.blocks.merkle import shard_id
from fluidfs.cli.inspect import relay_line
from fluidfs.cli.main import build_parser
from fluidfs.cli.nodeargs import relay_policy
from fluidfs.net.errors import RpcError
from fluidfs.node.node import Node, NodeConfig
from fluidfs.peers.relay import RelayPolicy
from fluidfs.statedir import StateDir

KIB = 1 << 10


def _policy(*options: str) -> RelayPolicy | None:
    return relay_policy(build_parser().parse_args(["serve", *options]))


def test_relay_options_set_the_relay_bounds() -> None:
    assert _policy("--relay") == RelayPolicy()
    assert _policy() is None
    given = _policy("--relay", "--relay-max-peers", "16", "--relay-max-connections", "3",
                    "--relay-limit", "20Mbit")
    assert given is not None
    assert (given.max_registered, given.max_relayed, given.rate) == (16, 3, 2_500_000)
    assert given.max_per_peer == 3, "no peer gets more than the relay's total"
    assert _policy("--relay", "--relay-limit", "off").rate is None
    assert _policy("--relay", "--relay-limit", "512").rate == 512 * KIB  # rclone: KiB/s


@pytest.mark.parametrize("argv", [
    ["--relay-max-connections", "4"],  # without --relay
    ["--relay", "--relay-max-peers", "0"],
    ["--relay", "--relay-limit", "fast"],
    ["--relay", "--relay-limit", "100B"],  # under 1 KiB/s: a mistake
])
def test_bad_relay_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _policy(*argv)


async def test_the_options_bind_a_running_relay(tmp_path: Path) -> None:
    """One registration place and 512 KiB/s per connection, as given on the command line:
    a second node is refused, and a relayed store is paced. (Fails before the options:
    the parser did not know them.)"""
    policy = _policy("--relay", "--relay-max-peers", "1", "--relay-limit", "512K")
    assert policy is not None
    async with lab(tmp_path, **asdict(policy)) as net:  # X holds the one place
        conn = await net.d.conns.connect(net.r.addr)
        with pytest.raises(RpcError) as err:
            await conn.call("RelayRegister", {})
        assert err.value.code == "busy"
        net.x.host_for(net.d)
        net.d.ledger.record(net.x.key, we_host=1 << 20, they_host=1 << 20, term=3600)
        data = os.urandom(384 * KIB)
        start = trio.current_time()
        await net.d.conns.call(net.x.key, "StoreShard",
                               {"shards": [{"id": shard_id(data), "data": data}]})
        assert trio.current_time() - start >= 0.65  # 384 KiB at 512 KiB/s, less the burst
        load = net.relay.load()
        assert (load["registered"], load["max_registered"], load["relayed"]) == (1, 1, 1)
        assert load["bytes_relayed"] >= 384 * KIB
        line = relay_line(load)
        assert line.startswith("1 of 1 peers registered, 1 of 128 connections")
        assert "at most 512.0K/s each way" in line


async def test_status_shows_the_relay_load(tmp_path: Path) -> None:
    """A node run with --relay reports its registrations against its bounds."""
    ring = keys.KeyRing(keys.generate())
    policy = _policy("--relay", "--relay-max-peers", "5", "--relay-max-connections", "7")
    node = Node(NodeConfig(ring, StateDir(tmp_path / "state"), listen="127.0.0.1:0",
                           relay=policy))
    peer = PeerNode(tmp_path / "peer")
    try:
        await node.start()
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run_services)
            await peer.start(nursery, listen=False)
            before = (await node.status.report())["relay"]
            conn = await peer.conns.connect(node.conns.listen_addr)
            assert (await conn.call("RelayRegister", {}))["ttl"] > 0
            await until(lambda: node.relay.registered == 1, what="the registration")
            after = (await node.status.report())["relay"]
            nursery.cancel_scope.cancel()
    finally:
        node.close()
        peer.close()
    assert before["registered"] == 0
    assert after == {"registered": 1, "max_registered": 5, "relayed": 0, "max_relayed": 7,
                     "max_per_peer": 7, "bytes_relayed": 0, "rate": 1 << 20}
    assert relay_line(after) == ("1 of 5 peers registered, 0 of 7 connections "
                                 "(at most 1.0M/s each way), 0B relayed")
