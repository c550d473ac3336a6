"""Relays (peers/relay.py, net/relaywire.py): a node nobody can dial is reached through a
relay it registered at; the handshake runs end to end, so the relay carries only
ciphertext and cannot answer as the peer; every bound a stranger can hit holds.

Real parts only: three in-process nodes on 127.0.0.1 (the relay listens; the registered
node and the dialler do not listen at all, as behind a NAT without UPnP).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from functools import partial

import nacl.signing
import pytest
import trio
from inproc import PeerNode, until

from fluidfs.blocks.merkle import shard_id
from fluidfs.net.channel import accept_channel
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import ID, OPS, OpSpec
from fluidfs.net.relaywire import (
    Status,
    make_accept,
    make_connect,
    make_status,
    parse_status,
)
from fluidfs.net.streamio import ExactReader
from fluidfs.net.tcp import open_rpc
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.relay import RelayPolicy, RelayServer
from fluidfs.peers.relayclient import RelayClient, RelayClientPolicy
from fluidfs.wire.schema import Bytes, Map


def _wire(node: PeerNode, **kw) -> None:
    """Give *node* a pool with relay parts (PeerNode builds a plain one)."""
    node.conns = Connections(node.keyring.signing_key, node.service, node.peers,
                             limits=node.conns.limits, is_partner=node.conns.is_partner, **kw)


class Lab:
    """A relay R (listening), a registered node X and a dialler D (neither listening)."""

    def __init__(self, tmp_path, policy: RelayPolicy, learn: bool = False) -> None:
        self.learn = learn
        holder: dict[str, object] = {}
        self.r = PeerNode(tmp_path / "r", relay_ops={
            "RelayRegister": lambda k, a: holder["server"]._register_op(k, a)})
        self.relay = RelayServer(policy, self._ask)
        holder["server"] = self.relay
        _wire(self.r, relay=self.relay)
        self.x = PeerNode(tmp_path / "x", relay_ops={
            "RelayIncoming": lambda k, a: holder["client"].incoming(k, a)})
        self.d = PeerNode(tmp_path / "d")
        self.via: list[str] = []
        _wire(self.d, via_of=lambda key: list(self.via) if key == self.x.key else [])
        self.client: RelayClient | None = None
        self._holder = holder

    async def _ask(self, target: bytes, token: bytes) -> None:
        await self.r.conns.call(target, "RelayIncoming", {"token": token}, timeout=5)

    async def start(self, nursery: trio.Nursery) -> None:
        await self.r.start(nursery)
        await self.x.start(nursery, listen=False)
        await self.d.start(nursery, listen=False)
        if self.learn:  # X is given no relay: it asks the peers it knows, best first
            self.client = RelayClient(
                self.x.conns, RelayClientPolicy(learn_interval=0.05),
                unreachable=lambda: True,
                candidates=lambda: [(self.d.key, "127.0.0.1:9"), (self.r.key, self.r.addr)])
            self.x.peers.add(self.r.key, self.r.addr)
        else:
            self.client = RelayClient(self.x.conns, RelayClientPolicy(relays=(self.r.addr,)))
        self._holder["client"] = self.client
        nursery.start_soon(self.client.run)
        await until(lambda: self.relay.is_registered(self.x.key), what="X registered")
        self.via = [self.r.addr]
        self.d.peers.add(self.x.key, "")

    def close(self) -> None:
        for node in (self.r, self.x, self.d):
            node.close()


@asynccontextmanager
async def lab(tmp_path, learn: bool = False, **policy):
    made = Lab(tmp_path, RelayPolicy(**policy), learn)
    try:
        async with trio.open_nursery() as nursery:
            await made.start(nursery)
            yield made
            nursery.cancel_scope.cancel()
    finally:
        made.close()


async def test_a_node_nobody_can_dial_is_reached_through_its_relay(tmp_path):
    """Fails before relays: D has no address for X and cannot reach it at all."""
    async with lab(tmp_path) as net:
        reply = await net.d.conns.call(net.x.key, "Ping", {})
        assert reply["time"] > 0
        conn = net.d.conns.conns[net.x.key]
        assert conn.peer_key == net.x.key  # X proved itself to D, end to end
        assert net.relay.relayed == 1 and net.relay.bytes_relayed > 0
        # X sees D as D (the handshake ran between them), and can call it back on it
        await until(lambda: net.d.key in net.x.conns.conns, what="X adopting D")
        assert (await net.x.conns.call(net.d.key, "Ping", {}))["time"] > 0


async def test_an_undialable_node_learns_a_relay_among_its_peers(tmp_path):
    """Given no relay, a node nobody can dial asks the peers it knows: one that cannot
    relay is passed over, the relay registers it, and it is reached through it.
    (Fails before: relays had to be given.)"""
    async with lab(tmp_path, learn=True) as net:
        # The relay counts X registered before its reply reaches X: wait for X to know.
        await until(lambda: net.client.via(), what="X to hear it is registered")
        assert [str(a) for a in net.client.via()] == [net.r.addr]
        assert (await net.d.conns.call(net.x.key, "Ping", {}))["time"] > 0
        assert net.relay.bytes_relayed > 0


async def test_direct_address_is_tried_first(tmp_path):
    """A peer that has a working address is dialled there, not through the relay."""
    async with lab(tmp_path) as net:
        port = await net.x.conns._nursery.start(net.x.conns.serve, "127.0.0.1", 0)
        net.d.peers.add(net.x.key, f"127.0.0.1:{port}")
        await net.d.conns.call(net.x.key, "Ping", {})
        assert net.relay.bytes_relayed == 0


async def test_the_relay_sees_no_plaintext_and_no_key(tmp_path):
    """A recording proxy in front of the relay sees every byte the relay forwards to and
    from the dialler: a known shard's bytes and both nodes' keys appear nowhere in it."""
    recorded = bytearray()
    async with lab(tmp_path) as net:

        async def proxy(client: trio.SocketStream) -> None:
            host, port = net.r.addr.split(":")
            upstream = await trio.open_tcp_stream(host, int(port))

            async def pump(src, dst):
                while data := await src.receive_some(65536):
                    recorded.extend(data)
                    await dst.send_all(data)
                await dst.send_eof()

            async with trio.open_nursery() as n:
                n.start_soon(pump, client, upstream)
                n.start_soon(pump, upstream, client)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, proxy, 0, host="127.0.0.1"))
            net.via = [f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"]
            net.x.host_for(net.d)
            net.d.ledger.record(net.x.key, we_host=1 << 20, they_host=1 << 20, term=3600)
            secret = os.urandom(200_000)
            sid = shard_id(secret)
            reply = await net.d.conns.call(
                net.x.key, "StoreShard", {"shards": [{"id": sid, "data": secret}]})
            assert reply["stored"] == [sid]
            back = await net.d.conns.call(net.x.key, "RetrieveShard", {"id": sid})
            assert back["data"] == secret
            nursery.cancel_scope.cancel()
    assert len(recorded) > 2 * len(secret)  # it did carry the shard both ways
    blob = bytes(recorded)
    for at in range(0, len(secret) - 32, 4096):
        assert secret[at:at + 32] not in blob
    for node in (net.x, net.d):
        assert bytes(node.keyring.signing_key) not in blob  # the Ed25519 seed


async def test_a_relay_cannot_answer_as_the_peer(tmp_path):
    """A relay that runs the handshake itself instead of splicing is refused: the dialler
    pins the peer's id."""
    async with lab(tmp_path) as net:
        evil = nacl.signing.SigningKey.generate()

        async def impostor(stream: trio.SocketStream) -> None:
            await ExactReader(stream).read_exactly(40)
            await stream.send_all(make_status(Status.OK))
            await accept_channel(stream, evil, timeout=5)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, impostor, 0, host="127.0.0.1"))
            net.via = [f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"]
            with pytest.raises(PeerUnavailable, match="not the expected one"):
                await net.d.conns.call(net.x.key, "Ping", {})
            assert net.x.key not in net.d.conns.conns
            nursery.cancel_scope.cancel()


async def _raw(addr: str, data: bytes) -> bytes:
    """Send *data* to the relay's port; what comes back before it closes (≤ 64 bytes)."""
    host, port = addr.split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    got = b""
    with trio.fail_after(5):
        try:
            await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass
        try:
            while chunk := await stream.receive_some(64):
                got += chunk
        except trio.BrokenResourceError:
            pass
    await stream.aclose()
    return got


@pytest.mark.parametrize("junk", [
    b"RLAX" + b"\x01\x01\x00\x00" + bytes(32),  # another magic
    b"RLAY" + b"\x02\x01\x00\x00" + bytes(32),  # another version
    b"RLAY" + b"\x01\x07\x00\x00" + bytes(32),  # unknown kind
    b"RLAY" + b"\x01\x03\x00\x00",  # a STATUS sent to the relay
    b"RLAY" + b"\x01\x01\x00\x01" + bytes(32),  # reserved bytes set
    b"RLAY\x01\x01\x00",  # cut short
    b"R" + os.urandom(1 << 20),  # a megabyte of junk
])
async def test_junk_preambles_are_closed_and_the_relay_goes_on(tmp_path, junk):
    async with lab(tmp_path) as net:
        assert await _raw(net.r.addr, junk) == b""
        assert net.relay.relayed == 0
        assert (await net.d.conns.call(net.x.key, "Ping", {}))["time"] > 0


async def test_connect_to_an_unregistered_peer_and_a_forged_token(tmp_path):
    async with lab(tmp_path) as net:
        answer = await _raw(net.r.addr, make_connect(os.urandom(32)))
        assert parse_status(answer) == Status.NOT_REGISTERED
        answer = await _raw(net.r.addr, make_accept(os.urandom(16)))
        assert parse_status(answer) == Status.BAD_TOKEN


async def test_registration_is_for_the_proven_identity_only(tmp_path):
    """RelayRegister carries no id: one naming another peer's is refused by the schema,
    and whoever registers is the identity its handshake proved."""
    async with lab(tmp_path) as net:
        host, port = net.r.addr.split(":")
        claims = {**OPS, "RelayRegister": OpSpec(Map({}, optional={"id": ID}), Map({}))}
        async with open_rpc(host, int(port), net.d.keyring.signing_key, ops=claims) as conn:
            with pytest.raises(RpcError) as err:
                await conn.call("RelayRegister", {"id": net.x.key})
            assert err.value.code == "bad_request"
            assert not net.relay.is_registered(net.d.key)
        conn = await net.d.conns.connect(net.r.addr)
        await conn.call("RelayRegister", {})
        assert net.relay.is_registered(net.d.key)


async def test_too_many_registrations_are_refused(tmp_path):
    async with lab(tmp_path, max_registered=1) as net:  # X holds the only place
        conn = await net.d.conns.connect(net.r.addr)
        with pytest.raises(RpcError) as err:
            await conn.call("RelayRegister", {})
        assert err.value.code == "busy"
        assert not net.relay.is_registered(net.d.key)
        assert (await net.d.conns.call(net.x.key, "Ping", {}))["time"] > 0  # X still there


async def test_relayed_pairs_per_peer_are_capped(tmp_path):
    async with lab(tmp_path, max_per_peer=1) as net:
        await net.d.conns.call(net.x.key, "Ping", {})  # holds the one pair to X
        answer = await _raw(net.r.addr, make_connect(net.x.key))
        assert parse_status(answer) == Status.BUSY


async def test_calls_passed_on_to_one_peer_are_rate_limited(tmp_path):
    """CONNECTs to one peer beyond its call rate get busy without the peer being asked:
    strangers cannot make it open streams without end."""
    async with lab(tmp_path, calls_burst=2, calls_per_second=0.01) as net:
        answers = [parse_status(await _raw(net.r.addr, make_connect(net.x.key)))
                   for _ in range(3)]
        # the first two were passed on (the raw dialler ran no handshake afterwards)
        assert answers == [Status.OK, Status.OK, Status.BUSY], answers


async def test_relay_incoming_from_a_node_we_are_not_registered_at(tmp_path):
    """Nobody but our relays can make us open streams."""
    async with lab(tmp_path) as net:
        await net.d.conns.call(net.x.key, "Ping", {})
        with pytest.raises(RpcError) as err:
            await net.d.conns.call(net.x.key, "RelayIncoming", {"token": os.urandom(16)})
        assert err.value.code == "refused"


async def test_pair_rate_and_idle_timeout(tmp_path):
    """Each relayed pair passes its token bucket; a pair idle past the timeout is cut."""
    async with lab(tmp_path, rate=512 << 10, idle_timeout=0.3) as net:
        net.x.host_for(net.d)
        net.d.ledger.record(net.x.key, we_host=1 << 20, they_host=1 << 20, term=3600)
        data = os.urandom(384 << 10)
        start = trio.current_time()
        await net.d.conns.call(net.x.key, "StoreShard",
                               {"shards": [{"id": shard_id(data), "data": data}]})
        assert trio.current_time() - start >= 0.65  # 384 KiB at 512 KiB/s, less the burst
        conn = net.d.conns.conns[net.x.key]
        await until(lambda: net.relay.relayed == 0, timeout=2, what="the idle pair cut")
        await until(lambda: conn.closed, timeout=2, what="D seeing the pair end")


def test_address_record_version_2_names_relays():
    """A node nobody can dial signs a record with no address and its relays; a tampered
    relay list fails the signature; each version keeps its own rules."""
    import cbor2

    from fluidfs.peers.address import PeerAddr
    from fluidfs.peers.addrrecord import RecordError, make_record, read_record

    me = nacl.signing.SigningKey.generate()
    relay = PeerAddr.parse("198.51.100.7:7470")
    record = read_record(make_record(me, [], via=[relay]).raw, bytes(me.verify_key))
    longest = [PeerAddr(".".join(["a" * 60] * 2), 65535)] * 3  # 127 characters each
    assert len(make_record(me, longest[:1], via=longest[:2]).raw) <= 640
    assert record.addrs == () and record.via == (relay,)
    plain = make_record(me, [PeerAddr.parse("198.51.100.9:7470")])
    assert cbor2.loads(plain.raw)["v"] == 1  # no relays: readable by nodes before them

    body = cbor2.loads(make_record(me, [PeerAddr.parse("198.51.100.9:7470")], via=[relay]).raw)
    for change in ({"via": ["203.0.113.66:7470"]},  # redirected through another relay
                   {"v": 1},  # a version 1 record has no relays
                   {"via": ["a:1", "b:2", "c:3"]},  # too many relays
                   {"addrs": ["a:1", "b:2"]}):  # four places in all
        with pytest.raises(RecordError):
            read_record(cbor2.dumps({**body, **change}))
    no_via = {k: v for k, v in body.items() if k != "via"}
    with pytest.raises(RecordError):
        read_record(cbor2.dumps(no_via))


async def test_a_relay_named_with_an_id_must_prove_it(tmp_path):
    """--relay-via PEERID@HOST:PORT: a node at that address with another id is not taken
    for the relay (no registration, nothing announced)."""
    from fluidfs.keys import encode_peer_id

    async with lab(tmp_path) as net:
        other = encode_peer_id(nacl.signing.SigningKey.generate().verify_key.encode())
        pinned = RelayClient(net.d.conns, RelayClientPolicy(relays=(f"{other}@{net.r.addr}",)))
        with pytest.raises(PeerUnavailable, match="not the expected one"):
            await pinned.register(pinned.policy.relays[0])
        assert not net.relay.is_registered(net.d.key) and pinned.via() == []
        right = f"{encode_peer_id(net.r.key)}@{net.r.addr}"
        pinned = RelayClient(net.d.conns, RelayClientPolicy(relays=(right,)))
        await pinned.register(right)
        assert net.relay.is_registered(net.d.key)
        assert [str(a) for a in pinned.via()] == [net.r.addr]


async def test_relay_ops_with_bad_fields_and_on_a_node_that_does_not_relay(tmp_path):
    """A token of the wrong size is refused by the schema at the peer; a node that is not
    a relay answers RelayRegister with unknown_op."""
    async with lab(tmp_path) as net:
        host, port = net.r.addr.split(":")
        await net.d.conns.call(net.x.key, "Ping", {})
        conn = net.d.conns.conns[net.x.key]
        conn.ops = {**OPS, "RelayIncoming": OpSpec(Map({"token": Bytes(max=64)}), Map({}))}
        for token in (b"", os.urandom(15), os.urandom(17), os.urandom(64)):
            with pytest.raises(RpcError) as err:  # our side lets any token through
                await conn.call("RelayIncoming", {"token": token})
            assert err.value.code == "bad_request"
        async with open_rpc(host, int(port), net.x.keyring.signing_key) as to_relay:
            assert (await to_relay.call("RelayRegister", {}))["ttl"] > 0
        with pytest.raises(RpcError) as err:
            await net.x.conns.call(net.d.key, "RelayRegister", {})
        assert err.value.code == "unknown_op"

