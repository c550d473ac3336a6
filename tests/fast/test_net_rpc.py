"""RPC over real TCP and real crypto: calls, errors, limits and hostile clients."""

from __future__ import annotations

import functools
import logging
import os
import struct
from typing import Any

import cbor2
import nacl.signing
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluidfs.net import (
    ChannelError,
    HandshakeError,
    RpcConnection,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
    accept_channel,
    connect_channel,
    dial,
    envelope,
    open_rpc,
    serve_tcp,
)
from fluidfs.net.channel import ChannelClosed
from fluidfs.net.envelope import loads as safe_loads
from fluidfs.net.messages import OPS, REQUEST_SCHEMAS, OpSpec
from fluidfs.wire.schema import Bytes, Int, Map, SchemaError

SERVER = nacl.signing.SigningKey(b"s" * 32)
CLIENT = nacl.signing.SigningKey(b"c" * 32)
OTHER = nacl.signing.SigningKey(b"o" * 32)
SERVER_PK = SERVER.verify_key.encode()
LYING_ID = b"\xee" * 32

# test-only ops, on top of the protocol's
TEST_OPS = {
    **OPS,
    "Echo": OpSpec(Map({"x": Int(), "pad": Bytes(max=1 << 20)}), Map({"x": Int()})),
    "Sleep": OpSpec(Map({"s": Int(0, 3600)}), Map({})),
    "Boom": OpSpec(Map({}), Map({})),
    "Refuse": OpSpec(Map({}), Map({})),
    "Lie": OpSpec(Map({}), Map({})),
}


class Service:
    """A minimal dispatcher: enough behaviour to exercise every RPC path."""

    def __init__(self) -> None:
        self.schemas = {**REQUEST_SCHEMAS, **{op: TEST_OPS[op].request for op in
                                             ("Echo", "Sleep", "Boom", "Refuse", "Lie")}}
        self.shards: dict[bytes, bytes] = {}
        self.active = 0
        self.max_active = 0
        self.peers: set[bytes] = set()

    async def handle(self, peer_key: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.peers.add(peer_key)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await getattr(self, "op_" + op)(args)
        finally:
            self.active -= 1

    async def op_Ping(self, args):
        return {"time": 1_700_000_000}

    async def op_StoreShard(self, args):
        for s in args["shards"]:
            self.shards[s["id"]] = s["data"]
        return {"stored": [s["id"] for s in args["shards"]], "refused": []}

    async def op_RetrieveShard(self, args):
        if args["id"] == LYING_ID:
            return {"data": 5}  # breaks the response schema: the server must catch it
        if args["id"] not in self.shards:
            raise RpcError("not_found", "no such shard")
        return {"data": self.shards[args["id"]]}

    async def op_Echo(self, args):
        await trio.sleep(0.001 * (args["x"] % 7))  # finish out of order
        return {"x": args["x"]}

    async def op_Sleep(self, args):
        await trio.sleep(args["s"])
        return {}

    async def op_Boom(self, args):
        raise ValueError("kaboom")

    async def op_Refuse(self, args):
        raise RpcError("over_quota", "full")

    async def op_Lie(self, args):
        return {"unexpected": 1}  # breaks the declared response schema


@pytest.fixture
def service():
    return Service()


@pytest.fixture
async def port(nursery, service):
    return await nursery.start(functools.partial(serve_tcp, "127.0.0.1", 0, SERVER, service))


def client(port, key=CLIENT, **kw):
    return open_rpc("127.0.0.1", port, key, SERVER_PK, **kw)


async def test_ping_and_identity(port, service):
    async with client(port) as conn:
        assert conn.peer_key == SERVER_PK
        assert await conn.call("Ping", {}) == {"time": 1_700_000_000}
    assert service.peers == {CLIENT.verify_key.encode()}


async def test_wrong_server_identity_refused(port):
    with pytest.raises(HandshakeError):
        async with open_rpc("127.0.0.1", port, CLIENT, OTHER.verify_key.encode()):
            pass


async def test_connection_limit_and_unreachable_peer(nursery, service):
    port = await nursery.start(functools.partial(
        serve_tcp, "127.0.0.1", 0, SERVER, service, max_connections=1))
    async with client(port) as conn:
        with pytest.raises(HandshakeError):  # refused: the only slot is taken
            await dial("127.0.0.1", port, OTHER, SERVER_PK)
        assert await conn.call("Ping", {})
    with trio.fail_after(5):  # the slot is free once the server has seen us leave
        while True:
            try:
                async with client(port) as conn:
                    assert await conn.call("Ping", {})
                break
            except HandshakeError:
                await trio.sleep(0.01)
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    with pytest.raises(ChannelError, match="cannot connect"):
        await dial("127.0.0.1", dead_port, CLIENT, SERVER_PK)


async def test_large_shards_both_ways(port):
    big = os.urandom(8 * 1024 * 1024)
    mid = os.urandom(65 * 1024 + 1)
    ids = [os.urandom(32), os.urandom(32)]
    async with client(port) as conn:
        for i, data in zip(ids, (big, mid), strict=True):
            r = await conn.call("StoreShard", {"shards": [{"id": i, "data": data}]})
            assert r == {"stored": [i], "refused": []}
        assert (await conn.call("RetrieveShard", {"id": ids[0]}))["data"] == big
        assert (await conn.call("RetrieveShard", {"id": ids[1]}))["data"] == mid
        with pytest.raises(RpcError) as ei:
            await conn.call("RetrieveShard", {"id": bytes(32)})
        assert ei.value.code == "not_found"


async def test_retrieved_shards_are_views_of_their_frame_and_stored_ones_bytes(port, service):
    """A long shard in a RetrieveShard reply is not copied out of the frame it came in
    (the op declares its readers take views); every other field, and a shard under
    64 KiB, is bytes as before, StoreShard's data on the serving side included."""
    sizes = {os.urandom(32): n for n in (100, 64 * 1024 - 1, 64 * 1024, 512 * 1024)}
    async with client(port) as conn:
        for sid, n in sizes.items():
            await conn.call("StoreShard", {"shards": [{"id": sid, "data": os.urandom(n)}]})
        assert all(type(v) is bytes for v in service.shards.values())
        for sid, n in sizes.items():
            got = (await conn.call("RetrieveShard", {"id": sid}))["data"]
            assert got == service.shards[sid]
            assert type(got) is (memoryview if n >= 64 * 1024 else bytes)
            if n >= 64 * 1024:
                assert got.readonly and type(got.obj) is bytes and len(got.obj) < n + 64


async def test_a_shard_sent_from_its_buffer_arrives_intact(port, service):
    """StoreShard with the shard as the request's tail (no copy on our side): the peer
    gets exactly the bytes, and the size limits still hold."""
    block = memoryview(os.urandom(3 * 1024 * 1024)).toreadonly()
    ids = [os.urandom(32) for _ in range(3)]
    async with client(port) as conn:
        for i, n in zip(ids, (0, 23, 1024 * 1024 + 5), strict=True):
            view = block[n : 2 * n]
            r = await conn.call("StoreShard", {"shards": [{"id": i, "data": envelope.TAIL}]},
                                tail=view)
            assert r == {"stored": [i], "refused": []}
            assert service.shards[i] == bytes(view)
        with pytest.raises(RpcError) as ei:
            await conn.call("StoreShard", {"shards": [{"id": ids[0], "data": envelope.TAIL}]},
                            tail=bytes(16 * 1024 * 1024))
        assert ei.value.code == "too_large"
        with pytest.raises(ValueError):  # the tail must be the last item encoded
            await conn.call("StoreShard", {"shards": [{"data": envelope.TAIL, "id": ids[0]}]},
                            tail=b"x")
        assert await conn.call("Ping", {})


def test_request_parts_are_the_plain_encoding():
    data = os.urandom(70_000)
    for n in (0, 1, 23, 24, 255, 256, 65_535, 65_536, 70_000):
        head, tail = envelope.encode_request_parts(
            9, "StoreShard", {"for": b"k" * 32, "shards": [{"id": b"i" * 32,
                                                          "data": envelope.TAIL}]}, data[:n])
        assert head + tail == envelope.encode_request(
            9, "StoreShard", {"for": b"k" * 32, "shards": [{"id": b"i" * 32,
                                                          "data": data[:n]}]})
    for args in ({"a": 1}, {"a": [envelope.TAIL, envelope.TAIL]},
                 {"a": envelope.TAIL, "b": b""}):
        with pytest.raises(ValueError):
            envelope.encode_request_parts(1, "X", args, b"x")


async def test_request_too_large_for_a_frame(port):
    async with client(port) as conn:
        shards = [{"id": bytes([i]) * 32, "data": bytes(8 * 1024 * 1024)} for i in range(2)]
        with pytest.raises(RpcError) as ei:
            await conn.call("StoreShard", {"shards": shards})
        assert ei.value.code == "too_large"
        assert await conn.call("Ping", {})


async def test_many_concurrent_calls_pair_correctly(port, service):
    results: dict[int, int] = {}
    async with client(port, ops=TEST_OPS) as conn:

        async def one(x: int) -> None:
            results[x] = (await conn.call("Echo", {"x": x, "pad": bytes(x % 5000)}))["x"]

        async with trio.open_nursery() as n:
            for x in range(300):
                n.start_soon(one, x)
    assert results == {x: x for x in range(300)}
    assert 1 < service.max_active <= 64


async def test_request_byte_budget_limits_concurrency(nursery):
    s1, s2 = trio.testing.memory_stream_pair()
    svc = Service()

    async def server() -> None:
        channel = await accept_channel(s2, SERVER)
        await RpcConnection(channel, svc, ops=TEST_OPS, max_bytes=300_000).run()

    nursery.start_soon(server)
    conn = RpcConnection(await connect_channel(s1, CLIENT, SERVER_PK), ops=TEST_OPS)
    await nursery.start(conn.run)
    async with trio.open_nursery() as n:
        for x in range(1, 9):
            n.start_soon(functools.partial(conn.call, "Echo", {"x": x, "pad": bytes(200_000)}))
    assert svc.max_active == 1
    await conn.aclose()


async def test_timeout_then_connection_still_works(port):
    async with client(port, ops=TEST_OPS) as conn:
        with trio.fail_after(5), pytest.raises(RpcTimeout):
            await conn.call("Sleep", {"s": 1}, timeout=0.1)
        assert await conn.call("Ping", {}) == {"time": 1_700_000_000}


async def test_error_codes(port, caplog):
    async with client(port, ops=TEST_OPS) as conn:
        for op, code in (("NoSuchOp", "unknown_op"), ("Boom", "internal"),
                         ("Refuse", "over_quota"), ("Lie", "bad_reply")):
            with caplog.at_level(logging.ERROR), pytest.raises(RpcError) as ei:
                await conn.call(op, {})
            assert ei.value.code == code, op
        assert "kaboom" in caplog.text  # the internal error was logged server-side
        with pytest.raises(RpcError) as ei:
            await conn.call("RetrieveShard", {"id": LYING_ID})
        assert ei.value.code == "internal"  # the server checks its own replies too
        assert await conn.call("Ping", {})  # the server and connection stay up


async def test_bad_arguments(port):
    async with client(port) as conn:
        with pytest.raises(SchemaError):  # caught before sending
            await conn.call("RetrieveShard", {"id": b"short"})
    async with client(port, ops={}) as conn:  # no client-side checks: server must refuse
        for args in ({"id": b"short"}, {}, {"id": bytes(32), "extra": 1}, {"id": "x" * 32}):
            with pytest.raises(RpcError) as ei:
                await conn.call("RetrieveShard", args)
            assert ei.value.code == "bad_request"
        assert await conn.call("Ping", {})


async def test_lying_peer_reply_is_bad_reply(nursery):
    """A server that skips its own response checks; the client must catch the lie."""

    class Liar:
        schemas = REQUEST_SCHEMAS

        async def handle(self, peer_key, op, args):
            return {"data": "not bytes"} if op == "RetrieveShard" else {"time": -1}

    s1, s2 = trio.testing.memory_stream_pair()

    async def server() -> None:
        channel = await accept_channel(s2, SERVER)
        await RpcConnection(channel, Liar(), ops={}).run()

    nursery.start_soon(server)
    conn = RpcConnection(await connect_channel(s1, CLIENT, SERVER_PK))
    await nursery.start(conn.run)
    for op, args in (("RetrieveShard", {"id": bytes(32)}), ("Ping", {})):
        with pytest.raises(RpcError) as ei:
            await conn.call(op, args)
        assert ei.value.code == "bad_reply"
    await conn.aclose()


async def test_dead_connection_fails_pending_calls(nursery, service):
    scope = trio.CancelScope()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await serve_tcp("127.0.0.1", 0, SERVER, service, task_status=task_status)

    port = await nursery.start(run_server)
    async with client(port, ops=TEST_OPS) as conn:
        async def kill_soon() -> None:
            while not service.active:  # the call is running on the server
                await trio.sleep(0.005)
            scope.cancel()

        nursery.start_soon(kill_soon)
        with trio.fail_after(5), pytest.raises(RpcConnectionLost):
            await conn.call("Sleep", {"s": 60})
        assert conn.closed
        with pytest.raises(RpcConnectionLost):
            await conn.call("Ping", {})


async def test_symmetric_calls_on_one_connection(nursery):
    s1, s2 = trio.testing.memory_stream_pair()
    svc_a, svc_b = Service(), Service()
    async with trio.open_nursery() as n:
        res = {}

        async def accept() -> None:
            res["b"] = await accept_channel(s2, SERVER)

        n.start_soon(accept)
        ch_a = await connect_channel(s1, CLIENT, SERVER_PK)
    a = RpcConnection(ch_a, svc_a)
    b = RpcConnection(res["b"], svc_b)
    await nursery.start(a.run)
    await nursery.start(b.run)
    assert await a.call("Ping", {}) == await b.call("Ping", {})
    assert svc_b.peers == {CLIENT.verify_key.encode()}
    assert svc_a.peers == {SERVER_PK}
    await a.aclose()
    await b.aclose()


# -- malformed envelopes from an authenticated peer --------------------------------------


async def raw_channel(port, key=OTHER):
    return await dial("127.0.0.1", port, key, SERVER_PK)


async def test_malformed_envelopes(port):
    ch = await raw_channel(port)
    cases = [
        ({"v": 1, "id": 7, "op": 5, "args": {}}, "bad_request"),
        ({"v": 1, "id": 8, "op": "Ping", "args": []}, "bad_request"),
        ({"v": 1, "id": 9, "op": "Ping", "args": {}, "x": 1}, "bad_request"),
        ({"v": 2, "id": 10, "op": "Ping", "args": {}}, "bad_version"),
        ({"v": 1, "id": 11, "op": "Ping", "args": {"a": 1.5}}, "bad_request"),
        ({"v": 1, "id": 12}, "bad_request"),
    ]
    for msg, code in cases:
        await ch.send(cbor2.dumps(msg))
        reply = safe_loads(await ch.receive())
        assert reply == {"v": 1, "id": msg["id"], "err": {"code": code, "msg": reply["err"]["msg"]}}
    await ch.send(cbor2.dumps({"v": 1, "id": 13, "op": "Ping", "args": {}}))
    assert safe_loads(await ch.receive())["ok"] == {"time": 1_700_000_000}
    await ch.aclose()
    # no recoverable id: the connection is dropped
    for junk in (b"\xff\xfe", cbor2.dumps([1, 2]), cbor2.dumps({"id": -1}),
                 cbor2.dumps(cbor2.CBORTag(35, "a+"))):
        async with await raw_channel(port) as ch:
            await ch.send(junk)
            with trio.fail_after(5), pytest.raises(ChannelClosed):
                await ch.receive()


async def test_tags_and_deep_nesting_refused():
    for tag in range(0, 70000):
        with pytest.raises(Exception):  # noqa: B017 - any decode error will do
            safe_loads(cbor2.dumps(cbor2.CBORTag(tag, 0)))
    deep: Any = 0
    for _ in range(100):
        deep = [deep]
    with pytest.raises(Exception):  # noqa: B017
        safe_loads(cbor2.dumps(deep))
    with pytest.raises(Exception):  # noqa: B017
        safe_loads(b"\x9f\x01\xff")  # indefinite-length array
    with pytest.raises(Exception):  # noqa: B017
        safe_loads(b"\xa2\x61a\x01\x61a\x02")  # duplicate key


async def test_server_survives_raw_garbage_and_truncation(port):
    garbage = await trio.open_tcp_stream("127.0.0.1", port)
    await garbage.send_all(b"\x00" * 1000)
    trunc = await trio.open_tcp_stream("127.0.0.1", port)
    await connect_channel(trunc, OTHER, SERVER_PK)
    await trunc.send_all(struct.pack(">I", 100) + b"x" * 10)
    await trunc.aclose()
    async with client(port) as conn:
        assert await conn.call("Ping", {})
    await garbage.aclose()


# -- property tests: hostile input, then a well-formed call from another client ----------


async def _with_server(body) -> None:
    async with trio.open_nursery() as n:
        port = await n.start(functools.partial(serve_tcp, "127.0.0.1", 0, SERVER, Service()))
        with trio.fail_after(10):
            await body(port)
            async with client(port) as conn:
                assert await conn.call("Ping", {}) == {"time": 1_700_000_000}
        n.cancel_scope.cancel()


PROPS = settings(max_examples=50, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
    | st.binary(max_size=64) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(["v", "id", "op", "args"]),
                      kids, max_size=5),
    max_leaves=20,
)


@PROPS
@given(junk=st.binary(max_size=400))
def test_prop_random_bytes_before_handshake(junk):
    async def body(port):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(junk)
        async with client(port) as conn:  # while the junk connection is still open
            assert await conn.call("Ping", {})
        await s.aclose()

    trio.run(_with_server, body)


@PROPS
@given(junk=st.binary(max_size=400), cut=st.integers(0, 64))
def test_prop_random_and_truncated_frames(junk, cut):
    async def body(port):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await connect_channel(s, OTHER, SERVER_PK)
        frame = struct.pack(">I", len(junk) + 17) + junk + bytes(17)
        await s.send_all(frame[: max(len(frame) - cut, 0)])
        await s.aclose()

    trio.run(_with_server, body)


@PROPS
@given(payload=st.binary(max_size=400))
def test_prop_random_plaintext_frames(payload):
    async def body(port):
        ch = await raw_channel(port)
        await ch.send(payload)
        with trio.move_on_after(0.5):
            try:
                reply = safe_loads(await ch.receive())
                assert set(reply) == {"v", "id", "err"}
            except ChannelClosed:
                pass
        await ch.aclose()

    trio.run(_with_server, body)


@PROPS
@given(value=cbor_values,
       envelope=st.fixed_dictionaries({"v": cbor_values, "id": st.integers(0, 2**64 - 1),
                                       "op": cbor_values, "args": cbor_values}))
def test_prop_valid_cbor_wrong_types(value, envelope):
    async def body(port):
        ch = await raw_channel(port)
        await ch.send(cbor2.dumps(value))
        await ch.send(cbor2.dumps(envelope))  # id always recoverable: expect an error reply
        with trio.move_on_after(2) as scope:
            try:
                replies = [safe_loads(await ch.receive())]
                if replies[0]["id"] != envelope["id"]:
                    replies.append(safe_loads(await ch.receive()))
                assert replies[-1]["id"] == envelope["id"]
                assert "err" in replies[-1] or envelope["op"] == "Ping"
            except ChannelClosed:
                assert not (type(value) is dict and type(value.get("id")) is int
                            and 0 <= value["id"] < 2**64)
        assert not scope.cancelled_caught
        await ch.aclose()

    trio.run(_with_server, body)
