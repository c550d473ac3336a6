"""A node nobody can dial finds a relay by discovery (issue 12): relays say so in their
signed address record, discovery looks for them while the node needs one, the node
registers at one it learnt and announces it, and replaces a relay that vanishes.

Real nodes (``Node``, all their loops) on 127.0.0.1: X listens nowhere (as behind a NAT
without UPnP) and is given only A, a peer that does not relay; A knows the relays.
"""

from __future__ import annotations

from pathlib import Path

import trio
from inproc import until

from fluidfs import keys
from fluidfs.node.node import Node, NodeConfig
from fluidfs.peers.discovery import DiscoveryPolicy
from fluidfs.peers.reach import ReachPolicy
from fluidfs.peers.relay import RelayPolicy
from fluidfs.peers.relayclient import RelayClientPolicy
from fluidfs.statedir import StateDir

QUICK_DISCOVERY = DiscoveryPolicy(target=1, fast=0.1, slow=0.1)
WAIT = 30.0  # seconds to wait for a condition that should come within one


def _node(root: Path, *, listen: str | None = "127.0.0.1:0", relay: bool = False,
          bootstrap: tuple[str, ...] = (), retry_refused: float = 60) -> Node:
    return Node(NodeConfig(
        keys.KeyRing(keys.generate()), StateDir(root), listen=listen, stores_data=False,
        bootstrap=list(bootstrap), discovery=QUICK_DISCOVERY,
        reach=ReachPolicy(interval=0.1),
        relay=RelayPolicy(registration_ttl=1) if relay else None,
        relay_client=RelayClientPolicy(learn_interval=0.05, retry_refused=retry_refused),
    ))


async def _run(node: Node, nursery: trio.Nursery) -> None:
    await node.start()
    await nursery.start(node.run_services)


async def test_an_undialable_node_finds_a_relay_it_was_not_given(tmp_path: Path) -> None:
    """X knows only A, which does not relay, and its table is at its discovery target:
    discovery still takes the relay R that A knows (R's record says it relays), X
    registers there and announces "reach me via R", and A reaches X through R.
    (Fails before: discovery stopped at the target and X never met a relay.)"""
    r = _node(tmp_path / "r", relay=True)
    nodes = [r]
    try:
        async with trio.open_nursery() as nursery:
            await _run(r, nursery)
            a = _node(tmp_path / "a", bootstrap=(r.conns.listen_addr,))
            nodes.append(a)
            await _run(a, nursery)
            await until(lambda: a.addresses.get(r.peers.self_key) is not None
                        and a.addresses.get(r.peers.self_key).relay,
                        what="A holding R's record, which says it relays")
            x = _node(tmp_path / "x", listen=None, bootstrap=(a.conns.listen_addr,))
            nodes.append(x)
            await _run(x, nursery)
            await until(lambda: x.relay_client.via(), timeout=10, what="X registered")
            assert [str(v) for v in x.relay_client.via()] == [r.conns.listen_addr]
            assert r.relay.is_registered(x.peers.self_key)
            await until(lambda: x.reach.record is not None and x.reach.record.via,
                        what="X's record naming R")
            assert [str(v) for v in x.reach.record.via] == [r.conns.listen_addr]
            assert not x.reach.record.addrs, "X has no address anyone can dial"
            assert not x.reach.record.relay

            await until(lambda: a.addresses.get(x.peers.self_key) is not None
                        and a.addresses.get(x.peers.self_key).via, what="A told of X's relay")
            a.conns.drop(x.peers.self_key, even_if_answering=True)  # X's own call to A
            x.conns.drop(a.peers.self_key, even_if_answering=True)
            before = r.relay.bytes_relayed
            assert (await a.conns.call(x.peers.self_key, "Ping", {}))["time"] > 0
            assert r.relay.bytes_relayed > before, "A reached X through R"
            nursery.cancel_scope.cancel()
    finally:
        for node in nodes:
            node.close()


async def test_a_relay_that_vanishes_is_replaced(tmp_path: Path) -> None:
    """X holds a registration at the relays it learnt; when one stops, X registers at
    another that says it relays and its record names the new one instead. (The waits are
    long: each is for something that comes in well under a second on an idle machine, and
    in seconds on a loaded one, where the whole fast layer shares two cores.)"""
    relays = [_node(tmp_path / f"r{i}", relay=True) for i in range(3)]
    nodes = list(relays)
    try:
        async with trio.open_nursery() as nursery:
            services = {}
            for r in relays:
                await r.start()
                scope = trio.CancelScope()
                services[r] = scope

                async def serve(node: Node = r, scope: trio.CancelScope = scope, *,
                                task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with scope:
                        await node.run_services(task_status=task_status)

                await nursery.start(serve)
            a = _node(tmp_path / "a", bootstrap=tuple(r.conns.listen_addr for r in relays))
            nodes.append(a)
            await _run(a, nursery)
            await until(lambda: all(
                a.addresses.get(r.peers.self_key) is not None for r in relays),
                what="A holding the relays' records", timeout=WAIT)
            # A registration that failed (a call timing out on a loaded machine) is asked
            # again only after ``retry_refused``: with a minute, one such failure leaves X
            # short of two relays, or without the spare, for longer than any wait here.
            x = _node(tmp_path / "x", listen=None, bootstrap=(a.conns.listen_addr,),
                      retry_refused=1)
            nodes.append(x)
            await _run(x, nursery)
            await until(lambda: len(x.relay_client.via()) == 2, timeout=WAIT,
                        what="X registered at two relays")
            held = {str(v) for v in x.relay_client.via()}
            gone = next(r for r in relays if r.conns.listen_addr in held)
            services[gone].cancel()  # the relay stops: its port closes
            spare = next(r for r in relays if r.conns.listen_addr not in held)
            await until(lambda: spare.relay.is_registered(x.peers.self_key), timeout=WAIT,
                        what="X registered at the spare relay")
            now_held = (held - {gone.conns.listen_addr}) | {spare.conns.listen_addr}
            await until(lambda: {str(v) for v in x.reach.record.via} == now_held,
                        what="X's record naming the spare relay, not the one gone", timeout=WAIT)
            nursery.cancel_scope.cancel()
    finally:
        for node in nodes:
            node.close()


async def test_a_relay_met_only_as_a_bootstrap_address_is_known_for_one(tmp_path: Path) -> None:
    """X is given only R's address: R's answer to X's reachability ping carries R's own
    record, which says it relays (no third peer passes it on), and X registers there."""
    r = _node(tmp_path / "r", relay=True)
    nodes = [r]
    try:
        async with trio.open_nursery() as nursery:
            await _run(r, nursery)
            await until(lambda: r.reach.record is not None, what="R's record")
            x = _node(tmp_path / "x", listen=None, bootstrap=(r.conns.listen_addr,))
            nodes.append(x)
            await _run(x, nursery)
            await until(lambda: x.relay_client.via(), timeout=10, what="X registered at R")
            await until(lambda: x.addresses.get(r.peers.self_key) is not None
                        and x.addresses.get(r.peers.self_key).relay,
                        what="X holding R's record, which says it relays")
            nursery.cancel_scope.cancel()
    finally:
        for node in nodes:
            node.close()
