"""Strangers against a real `fluidfs serve`: bad addresses, a flood of identities, eclipse.

Each test plays one attack over real TCP on 127.0.0.1 (``open_rpc`` and in-process
listeners for the attacker's identities) and checks what the node's user would see: the
node stays up (also after a restart), its peer table stays within its cap, it does not
become a reflector aimed at a victim address, and it refers newcomers to the peers it has
known longest rather than to the newest strangers.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import cbor2
import nacl.signing
import pytest
import trio
from peerhelpers import Peer, status

from fluidfs import keys
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import REQUEST_SCHEMAS
from fluidfs.net.tcp import open_rpc, serve_tcp
from fluidfs.store.db import META_TABLES, Database

MIB = 1024 * 1024
TERMS = {"offer": MIB, "ask": MIB, "term": 3600}
# docs/protocol.md §5 "Peer table and discovery": a serve node aims for 2N = 24 peers and
# keeps at most 4 x 24 rows (plus peers with agreements); it dials at most 16 unverified
# addresses at once, then one every 10 s, and any one address at most twice.
TABLE_CAP = 96
DIAL_BURST = 16
DIAL_INTERVAL = 10.0


@pytest.fixture
def server(tmp_path):
    made: list[Peer] = []

    def start(name: str = "server", *extra: str) -> Peer:
        peer = Peer(tmp_path, name, donate="64M", extra=list(extra))
        made.append(peer)
        return peer.start()

    yield start
    for peer in made:
        peer.kill()


def endpoint(peer: Peer) -> tuple[str, int]:
    host, port = peer.addr.rsplit(":", 1)
    return host, int(port)


def pid(key: nacl.signing.SigningKey) -> bytes:
    return key.verify_key.encode()


async def alive(peer: Peer) -> None:
    """The process runs and answers a Ping from a stranger."""
    assert peer.proc is not None and peer.proc.poll() is None, peer.log()
    async with open_rpc(*endpoint(peer), nacl.signing.SigningKey.generate(), timeout=10) as c:
        assert (await c.call("Ping", {}, timeout=10))["time"] > 0


async def rows_of(peer: Peer) -> dict[str, dict]:
    reply = await trio.to_thread.run_sync(peer.control, "peers", "--json")
    return {row["id"]: row for row in reply["peers"]}


async def wait_until(predicate, timeout: float, what: str) -> Any:
    deadline = trio.current_time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await trio.sleep(0.2)


class Liar:
    """An attacker's peer service: answers Ping, and ShareNewPeers with what it is given."""

    schemas = REQUEST_SCHEMAS

    def __init__(self, shared: list[dict] | None = None) -> None:
        self.shared = shared or []
        self.asked = 0

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op == "Ping":
            return {"time": int(time.time())}
        if op == "ShareNewPeers":
            self.asked += 1
            return {"peers": self.shared}
        raise RpcError("unknown_op", op)


async def listen_as(nursery: trio.Nursery, key: nacl.signing.SigningKey, svc: Any) -> str:
    """Serve the peer protocol as *key* on 127.0.0.1; return its address."""
    port = await nursery.start(serve_tcp, "127.0.0.1", 0, key, svc)
    return f"127.0.0.1:{port}"


async def victim(nursery: trio.Nursery, accepted: list[float]) -> str:
    """A plain TCP service that is no fluidfs peer; counts the connections it accepts."""

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(time.monotonic())
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"),
                                    handler, 0)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


# --- 1. a malformed address must not crash the node, now or at its next start -------------


async def test_malformed_addresses_neither_crash_the_node_nor_survive_a_restart(server):
    """Ping{addr:"x"} was saved as a peer row; the next discovery round's split_addr raised
    ValueError, which ended the node, and did so again at every start."""
    node = server()
    bad = ["x", "host:", ":1", "1.2.3.4:99999", "[::1]:0", "a b:1", "0.0.0.0:7470",
           "224.0.0.1:5", "255.255.255.255:5", "-bad-.example:1", "127.1:80"]
    for addr in bad:
        async with open_rpc(*endpoint(node), nacl.signing.SigningKey.generate()) as conn:
            try:
                await conn.call("Ping", {"addr": addr})
            except RpcError as exc:
                assert exc.code == "bad_request", exc
            try:
                await conn.call("ProposeAgreement", {**TERMS, "addr": addr})
            except RpcError as exc:
                assert exc.code == "bad_request", exc
    # On purpose: the node must outlive two discovery rounds over what it was told (1 s
    # apart while it wants peers); a round that does not crash leaves nothing to wait for.
    await trio.sleep(2.5)
    await alive(node)
    # A peer whose ShareNewPeers answer names malformed addresses: the node asks it once
    # it has verified it (it listens where it says it does).
    liar_key = nacl.signing.SigningKey.generate()
    liar = Liar([{"id": os.urandom(32), "addr": addr} for addr in bad])
    async with trio.open_nursery() as nursery:
        liar_addr = await listen_as(nursery, liar_key, liar)
        async with open_rpc(*endpoint(node), liar_key) as conn:
            await conn.call("Ping", {"addr": liar_addr})
        await wait_until(lambda: _true(liar.asked >= 2), 30, "the node to ask the liar twice")
        asked = liar.asked
        await wait_until(lambda: _true(liar.asked >= asked + 2), 30,
                         "two more discovery rounds over the liar's answer")
        await alive(node)
        nursery.cancel_scope.cancel()
    addrs = [row["addr"] for row in (await rows_of(node)).values()]
    assert not set(addrs) & set(bad), addrs
    node.stop()
    node.start()
    await trio.sleep(2.5)  # on purpose: discovery rounds over the rows saved before
    await alive(node)


async def _true(value: bool) -> bool:
    return value


def test_bad_peer_rows_on_disk_are_skipped(server):
    """A row the node cannot read (bad CBOR, unknown version, wrong types, bad address) was
    fatal at every start."""
    node = server()
    node.stop()
    # Rows are read in key order: the good row comes before the one that reuses its index.
    good, bad_addr = b"\x00" + os.urandom(31), b"\x01" + os.urandom(31)
    now = time.time()
    row = {"v": 1, "index": 7, "addr": "127.0.0.1:9", "first_seen": now, "last_seen": now,
           "referrer": None, "trust": 1.0, "ok": 0, "fail": 0}
    db = Database(node.state / "meta.lmdb", META_TABLES)
    with db.write() as txn:
        peers = db["peers"]
        txn.put(good, cbor2.dumps(row), db=peers)
        txn.put(bad_addr, cbor2.dumps({**row, "index": 8, "addr": "x"}), db=peers)
        txn.put(os.urandom(32), b"\xff\x00garbage", db=peers)
        txn.put(os.urandom(32), cbor2.dumps({**row, "index": 9, "v": 99}), db=peers)
        txn.put(os.urandom(32), cbor2.dumps({**row, "index": "ten"}), db=peers)
        txn.put(os.urandom(32), cbor2.dumps({**row, "index": 11, "trust": "high"}), db=peers)
        txn.put(os.urandom(32), cbor2.dumps([1, 2, 3]), db=peers)
        txn.put(b"short key", cbor2.dumps({**row, "index": 12}), db=peers)
        txn.put(b"\xff" + os.urandom(31), cbor2.dumps({**row, "index": 7}), db=peers)  # taken
    db.env.close()
    node.start()
    time.sleep(2.5)  # on purpose: a couple of discovery rounds over the rows (once fatal)
    assert node.proc is not None and node.proc.poll() is None, node.log()
    rows = {row["id"]: row for row in node.control("peers", "--json")["peers"]}
    assert set(rows) == {keys.encode_peer_id(good), keys.encode_peer_id(bad_addr)}, rows
    assert rows[keys.encode_peer_id(bad_addr)]["addr"] == ""
    assert rows[keys.encode_peer_id(good)]["addr"] == "127.0.0.1:9"


# --- 3. a flood of identities: table growth and reflection ---------------------------------


async def test_a_flood_of_identities_neither_fills_the_table_nor_aims_the_node_at_a_victim(
    server,
):
    """500 fresh identities each Ping with an address of a service that is no peer: once
    each became a peer row, and discovery dialled their addresses every round for a week."""
    node = server()
    accepted: dict[str, list[float]] = {}
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            hits: list[float] = []
            accepted[await victim(nursery, hits)] = hits
        targets = list(accepted)
        claims = trio.Semaphore(8)  # within the per-IP handshake cap (all from 127.0.0.1)

        async def stranger(i: int) -> None:
            async with claims, open_rpc(*endpoint(node), nacl.signing.SigningKey.generate(),
                                        timeout=30) as conn:
                # Half of them name one victim, the others spread over all twenty.
                addr = targets[0] if i % 2 else targets[i % len(targets)]
                await conn.call("Ping", {"addr": addr}, timeout=30)

        started = time.monotonic()
        async with trio.open_nursery() as flood:
            for i in range(500):
                flood.start_soon(stranger, i)
        await trio.sleep(6)  # on purpose: the time in which dials to the victims are counted
        elapsed = time.monotonic() - started
        await alive(node)
        nursery.cancel_scope.cancel()
    per_victim = {addr: len(hits) for addr, hits in accepted.items()}
    assert max(per_victim.values()) <= 2, per_victim
    allowed = DIAL_BURST + elapsed / DIAL_INTERVAL + 1
    assert sum(per_victim.values()) <= allowed, (sum(per_victim.values()), allowed)
    known = (await trio.to_thread.run_sync(status, node.state))["peers_known"]
    assert known <= TABLE_CAP, known


async def test_a_ping_moves_a_known_peer_only_to_an_address_where_it_answers(server):
    """A known identity's Ping{addr} replaced its row's address unchecked: it could point
    the node (and everyone the node refers to it) at any address."""
    node = server()
    me = nacl.signing.SigningKey.generate()
    hits: list[float] = []
    async with trio.open_nursery() as nursery:
        home = await listen_as(nursery, me, Liar())
        elsewhere = await victim(nursery, hits)
        async with open_rpc(*endpoint(node), me) as conn:
            await conn.call("Ping", {"addr": home})
            mine = keys.encode_peer_id(pid(me))

            async def verified() -> bool:
                row = (await rows_of(node)).get(mine)
                return row is not None and row["addr"] == home

            await wait_until(verified, 20, "the node to verify the stranger's address")
            await conn.call("Ping", {"addr": elsewhere})
            await wait_until(lambda: _true(len(hits) >= 1), 20, "a dial-back to the new address")
            await wait_until(lambda: _true(node.logged(f"no peer answers at {elsewhere}")), 20,
                             "the node to find no peer at the new address")
            assert (await rows_of(node))[mine]["addr"] == home
            await conn.call("Ping", {"addr": elsewhere})
            await trio.sleep(1.5)  # on purpose: time for a second dial, which must not come
        assert len(hits) == 1, hits
        nursery.cancel_scope.cancel()


# --- eclipse: referrals favour long-known peers --------------------------------------------


async def test_share_new_peers_refers_long_known_peers_first(server):
    """ShareNewPeers sorted by last seen: any identities that had just pinged came first,
    so a newcomer's first view of the network was the attacker's."""
    node = server()
    honest = [server(f"h{i}", "--peer", node.addr) for i in range(3)]
    honest_ids = {h.public_key for h in honest}

    async def knows_honest() -> bool:
        rows = await rows_of(node)
        return all(keys.encode_peer_id(k) in rows and rows[keys.encode_peer_id(k)]["addr"]
                   for k in honest_ids)

    async with trio.open_nursery() as nursery:
        await wait_until(knows_honest, 30, "the node to know the honest peers")
        strangers = [nacl.signing.SigningKey.generate() for _ in range(12)]
        for key in strangers:
            addr = await listen_as(nursery, key, Liar())
            async with open_rpc(*endpoint(node), key) as conn:
                await conn.call("Ping", {"addr": addr})
        dead = [nacl.signing.SigningKey.generate() for _ in range(12)]
        for key in dead:  # claim addresses where nobody answers as them
            async with open_rpc(*endpoint(node), key) as conn:
                await conn.call("Ping", {"addr": honest[0].addr})

        async def strangers_verified() -> bool:
            rows = await rows_of(node)
            return all(keys.encode_peer_id(pid(k)) in rows for k in strangers)

        await wait_until(strangers_verified, 30, "the node to verify the strangers")
        for key in strangers:  # the strangers keep in touch: they are the freshest
            async with open_rpc(*endpoint(node), key) as conn:
                await conn.call("Ping", {})
        async with open_rpc(*endpoint(node), nacl.signing.SigningKey.generate()) as conn:
            first = (await conn.call("ShareNewPeers", {"max": 3}))["peers"]
            everyone = (await conn.call("ShareNewPeers", {"max": 64}))["peers"]
        nursery.cancel_scope.cancel()
    assert {p["id"] for p in first} == honest_ids, first
    shared = {p["id"] for p in everyone}
    assert not shared & {pid(k) for k in dead}
    assert {p["addr"] for p in first} == {h.addr for h in honest}
