"""The network layer's resource limits, in process: real TCP on 127.0.0.1, real crypto.

Each test is one thing a hostile peer tries (memory, the event loop, connections) and
what an honest peer still gets. Limits are shrunk where the defaults would make a test
slow; the defaults themselves are in fluidfs/net/limits.py and docs/protocol.md §5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import cbor2
import nacl.signing
import pytest
import trio
import trio.testing
from inproc import slow_jump_clock

from fluidfs.net import envelope
from fluidfs.net.channel import ChannelClosed, accept_channel
from fluidfs.net.errors import ChannelError, HandshakeError, RpcConnectionLost, RpcError
from fluidfs.net.limits import DEFAULT_LIMITS, NetLimits, parse_limits
from fluidfs.net.messages import OPS, REQUEST_SCHEMAS
from fluidfs.net.rpc import RpcConnection, reply_bound, request_bound
from fluidfs.net.tcp import dial, open_rpc, serve_tcp
from fluidfs.peers.connections import Connections
from fluidfs.peers.peerlist import PeerList
from fluidfs.store.db import META_TABLES, Database

SERVER = nacl.signing.SigningKey(b"S" * 32)
SERVER_PK = SERVER.verify_key.encode()
PARTNER = nacl.signing.SigningKey(b"P" * 32)
PARTNER_PK = PARTNER.verify_key.encode()
MIB = 1 << 20
BIG = 8 * MIB - 4096  # a shard as large as fits a frame with its envelope


class Service:
    """Stores shards in a dict; counts the handlers that ran."""

    schemas = REQUEST_SCHEMAS

    def __init__(self) -> None:
        self.shards: dict[bytes, bytes] = {}
        self.calls: dict[str, int] = {}

    async def handle(self, peer_key: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls[op] = self.calls.get(op, 0) + 1
        if op == "Ping":
            return {"time": 1}
        if op == "StoreShard":
            for s in args["shards"]:
                self.shards[s["id"]] = s["data"]
            return {"stored": [s["id"] for s in args["shards"]], "refused": []}
        if op == "RetrieveShard":
            if args["id"] not in self.shards:
                raise RpcError("not_found", "no such shard")
            return {"data": self.shards[args["id"]]}
        if op == "ShareNewPeers":
            return {"peers": []}
        raise RpcError("unknown_op", op)


async def start(nursery, service=None, *, partners=(PARTNER_PK,), **limits) -> int:
    """A serve_tcp server whose partners are ``partners``; returns its port."""
    partner_set = set(partners)
    return await nursery.start(
        functools.partial(
            serve_tcp,
            "127.0.0.1",
            0,
            SERVER,
            service or Service(),
            limits=dataclasses.replace(DEFAULT_LIMITS, **limits),
            is_partner=lambda key: key in partner_set,
        )
    )


def client(port: int, key: nacl.signing.SigningKey = PARTNER, **kw):
    return open_rpc("127.0.0.1", port, key, SERVER_PK, **kw)


def stranger() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def head(rid: int, op: str) -> bytes:
    """The start of a request envelope, up to (not including) the args map."""
    parts = [cbor2.dumps(x) for x in ("v", 1, "id", rid, "op", op, "args")]
    return b"\xa4" + b"".join(parts)


def args_of_empty_maps(n: int) -> bytes:
    """``{"x": [{}, {}, ...]}`` with n empty maps: one wire byte each, ~72 bytes decoded."""
    return b"\xa1" + cbor2.dumps("x") + b"\x9a" + n.to_bytes(4, "big") + b"\xa0" * n


def reply_of_empty_maps(rid: int, n: int) -> bytes:
    parts = [cbor2.dumps(x) for x in ("v", 1, "id", rid, "ok")]
    return b"\xa3" + b"".join(parts) + args_of_empty_maps(n)


async def ask(channel, frame: bytes) -> dict:
    """Send one raw request frame, return the decoded reply."""
    await channel.send(frame)
    with trio.fail_after(10):
        return envelope.loads(await channel.receive())


@contextlib.contextmanager
def at_once(seconds: float, hang: float = 30.0) -> Iterator[None]:
    """Assert that the block took at most *seconds* of wall time less the time this (the
    loop's) thread sat runnable waiting for a CPU (the kernel's run delay,
    /proc/.../schedstat): what a loaded machine adds is not counted, a wait on the node
    (a queue, a timeout, pacing) is. Fails after *hang* seconds in any case."""
    sched = f"/proc/self/task/{threading.get_native_id()}/schedstat"

    def run_delay() -> float:
        with open(sched) as f:
            return int(f.read().split()[1]) / 1e9

    started, delay = time.perf_counter(), run_delay()
    with trio.fail_after(hang):
        yield
    took = time.perf_counter() - started - (run_delay() - delay)
    assert took < seconds, f"took {took:.2f} s (not counting waits for a CPU); {seconds} s at most"


async def wait_closed(channel, timeout: float = 5) -> None:
    """The server ends the channel within ``timeout``."""
    with trio.fail_after(timeout), pytest.raises(ChannelClosed):
        while True:
            await channel.receive()


# --- sizes: what every legitimate message needs ------------------------------------------


def test_every_v1_message_at_its_largest_fits_the_item_cap():
    """The item cap and per-op bounds leave room for the largest honest messages."""
    largest = {
        "StoreShard": {"shards": [{"id": bytes(32), "data": bytes(1)} for _ in range(64)]},
        "DeleteShard": {"ids": [os.urandom(32) for _ in range(1024)]},
    }
    for op, args in largest.items():
        frame = envelope.encode_request(2**64 - 1, op, args)
        found = envelope.peek(frame)
        bound = request_bound(OPS[op].request)
        assert found.items <= bound.items <= envelope.MAX_ITEMS and len(frame) <= bound.size
    peers = {"peers": [{"id": os.urandom(32), "addr": "\U0001f600" * 300} for _ in range(256)]}
    frame = envelope.encode_ok(2**64 - 1, peers)
    bound = reply_bound(OPS["ShareNewPeers"].response, 9 * MIB)
    assert envelope.peek(frame).items <= bound.items <= envelope.MAX_ITEMS
    assert len(frame) <= bound.size
    shard = envelope.encode_ok(7, {"data": bytes(8 * MIB)})
    assert len(shard) <= reply_bound(OPS["RetrieveShard"].response, 9 * MIB).size


def test_net_limits_parse():
    limits = parse_limits("idle_timeout=0.5, max_strangers_per_ip=3")
    assert limits.idle_timeout == 0.5 and limits.max_strangers_per_ip == 3
    assert limits.max_connections == NetLimits().max_connections
    for bad in ("nope=1", "idle_timeout=x", "max_connections=0", "max_strangers=999"):
        with pytest.raises(ValueError):
            parse_limits(bad)


# --- memory: items are counted before anything is decoded --------------------------------


async def test_floods_of_tiny_items_are_refused_before_decoding(nursery):
    """1 MiB of empty maps used to decode to ~72 MB; now it is refused from a walk of its
    structure that stops at the item cap, and the connection keeps working."""
    port = await start(nursery)
    floods = [
        head(1, "Ping") + args_of_empty_maps(MIB),
        head(2, "DeleteShard") + args_of_empty_maps(100_000),
    ]
    channel = await dial("127.0.0.1", port, PARTNER, SERVER_PK)
    tracemalloc.start()
    try:
        replies = [await ask(channel, frame) for frame in floods]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * MIB, f"server held {peak / MIB:.0f} MiB for 1.1 MiB of frames"
    assert [r["err"]["code"] for r in replies] == ["too_large", "too_large"]
    deep = head(3, "Ping") + b"\xa1" + cbor2.dumps("x") + b"\x81" * 100_000 + b"\x00"
    assert (await ask(channel, deep))["err"]["code"] == "bad_request"
    assert "ok" in await ask(channel, envelope.encode_request(4, "Ping", {}))
    await channel.aclose()


async def test_large_frames_only_for_ops_that_carry_shards(nursery):
    """A stranger announcing an 8 MiB frame is dropped from its 4-byte length, before we
    allocate or read the body; a partner may send one, but only as a StoreShard."""
    port = await start(nursery)
    channel = await dial("127.0.0.1", port, stranger(), SERVER_PK)
    raw = channel._stream  # the frame header goes out in clear; the body never comes
    await raw.send_all(struct.pack(">I", 8 * MIB))
    await wait_closed(channel, timeout=2)
    partner = await dial("127.0.0.1", port, PARTNER, SERVER_PK)
    fat_ping = head(6, "Ping") + b"\xa1" + cbor2.dumps("x") + cbor2.dumps(bytes(2 * MIB))
    assert (await ask(partner, fat_ping))["err"]["code"] == "too_large"
    ping = envelope.encode_request(5, "Ping", {"addr": "x" * 300})
    assert "ok" in await ask(partner, ping)
    store = {"shards": [{"id": os.urandom(32), "data": os.urandom(BIG)}]}
    assert "ok" in await ask(partner, envelope.encode_request(7, "StoreShard", store))
    await partner.aclose()


async def test_a_huge_reply_to_a_small_call_is_refused_without_decoding(nursery):
    """A server answering Ping with 128 KiB of empty maps (9 MB decoded) gets bad_reply
    from its size alone; with 4 MiB the client hangs up before reading it."""
    answers = [reply_of_empty_maps(1, 120_000), reply_of_empty_maps(2, 4 * MIB)]

    async def liar(stream: trio.SocketStream) -> None:
        channel = await accept_channel(stream, SERVER)
        with contextlib.suppress(ChannelError):  # the client hangs up on the second
            for answer in answers:
                await channel.receive()
                await channel.send(answer)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, liar, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with open_rpc("127.0.0.1", port, PARTNER, SERVER_PK) as conn:
        tracemalloc.start()
        try:
            with pytest.raises(RpcError) as info:
                await conn.call("Ping", {})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 3 * MIB, f"client held {peak / MIB:.1f} MiB for a 120 KB reply"
        assert info.value.code == "bad_reply" and "too many" in info.value.msg
        with pytest.raises(RpcConnectionLost):
            await conn.call("Ping", {})


async def test_replies_are_counted_so_unread_ones_stop_the_reader(nursery):
    """A partner asking for an 8 MiB shard over and over without reading the replies can
    make us hold only its connection's share, and is dropped after the send timeout."""
    service = Service()
    sid = os.urandom(32)
    service.shards[sid] = os.urandom(BIG)
    port = await start(nursery, service, send_timeout=1.5, partner_conn_bytes=40 * MIB)
    channel = await dial("127.0.0.1", port, PARTNER, SERVER_PK)
    for rid in range(1, 21):
        await channel.send(envelope.encode_request(rid, "RetrieveShard", {"id": sid}))
    await trio.sleep(0.5)
    # 2 x 8 MiB reserved per reply before its handler runs: 40 MiB has room for two
    assert service.calls["RetrieveShard"] <= 2
    await trio.sleep(2)
    with trio.fail_after(5), pytest.raises(ChannelClosed):
        while True:  # after the replies already in flight, the server has hung up
            await channel.receive()
    async with client(port) as conn:  # the share is free again
        assert len((await conn.call("RetrieveShard", {"id": sid}))["data"]) == BIG


async def test_strangers_cannot_take_the_room_partners_need(nursery):
    """Strangers that announce frames and never finish them hold at most their share of
    the node; a partner is served at once meanwhile, and the slow frames time out."""
    port = await start(
        nursery, stranger_conn_bytes=256 << 10, stranger_bytes=MIB, frame_timeout=1.0
    )
    slow = []
    for _ in range(8):
        channel = await dial("127.0.0.1", port, stranger(), SERVER_PK)
        await channel._stream.send_all(struct.pack(">I", 100_000) + b"x" * 10)
        slow.append(channel)
    async with client(port) as conn:
        with at_once(0.5):
            assert await conn.call("Ping", {})
    for channel in slow:
        await wait_closed(channel, timeout=3)  # frame_timeout ended each of them
    async with client(port, key=stranger()) as conn:
        with at_once(1):
            assert await conn.call("Ping", {})


# --- the event loop: large frames are decoded in a thread ---------------------------------


class LongestStep(trio.abc.Instrument):
    """The longest time one task step held the event loop, in CPU time of the loop's
    thread (wall time would also count other processes preempting us on a busy machine)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._start: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._start = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._start is not None:  # None: added in the middle of this step
            self.longest = max(self.longest, time.thread_time() - self._start)


async def test_big_frames_do_not_block_the_event_loop(nursery):
    """Neither a 2 MiB frame of empty maps (0.2 s to decode before) nor the largest
    legitimate StoreShard holds the event loop for more than a few milliseconds."""
    service = Service()
    port = await start(nursery, service)
    channel = await dial("127.0.0.1", port, PARTNER, SERVER_PK)
    shard = {"id": os.urandom(32), "data": os.urandom(BIG)}
    legit = envelope.encode_request(2, "StoreShard", {"shards": [shard]})
    flood = head(1, "StoreShard") + args_of_empty_maps(2 * MIB)
    await ask(channel, envelope.encode_request(3, "Ping", {}))  # warm up
    timer = LongestStep()
    trio.lowlevel.add_instrument(timer)
    try:
        refused = await ask(channel, flood)
        stored = await ask(channel, legit)
    finally:
        trio.lowlevel.remove_instrument(timer)
    assert timer.longest < 0.05, f"the loop was held for {timer.longest * 1000:.0f} ms"
    assert refused["err"]["code"] == "too_large"
    assert stored["ok"]["stored"] == [shard["id"]]
    assert service.shards[shard["id"]] == shard["data"]
    await channel.aclose()


# --- connections: admission caps and timeouts ---------------------------------------------


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Virtual time that moves only while nothing runs (inproc.slow_jump_clock)."""
    return slow_jump_clock()


async def connected(nursery, port: int, key: nacl.signing.SigningKey) -> RpcConnection | None:
    """Dial, make one call and keep the connection open (None if refused)."""
    try:
        channel = await dial("127.0.0.1", port, key, SERVER_PK)
    except HandshakeError:
        return None
    conn = RpcConnection(channel)
    await nursery.start(conn.run)
    try:
        await conn.call("Ping", {}, timeout=5)
    except RpcConnectionLost:
        return None
    return conn


async def test_strangers_per_address_are_capped_but_partners_get_in(nursery):
    port = await start(nursery, max_strangers_per_ip=4, min_idle_to_evict=60)
    strangers = [await connected(nursery, port, stranger()) for _ in range(6)]
    assert all(strangers[:4]) and strangers[4:] == [None, None]
    conn = await connected(nursery, port, PARTNER)  # partners do not count against the address
    assert conn is not None and await conn.call("Ping", {})
    for c in strangers[:4]:
        assert await c.call("Ping", {})  # the first four were left alone


async def test_idle_strangers_make_room_for_newcomers(nursery):
    port = await start(nursery, max_strangers_per_ip=2, min_idle_to_evict=0.2)
    first, second = (
        await connected(nursery, port, stranger()),
        await connected(nursery, port, stranger()),
    )
    await trio.sleep(0.3)
    await second.call("Ping", {})  # now busier than `first`
    newcomer = await connected(nursery, port, stranger())
    assert newcomer is not None
    with trio.fail_after(2):
        while not first.closed:  # the longest-idle stranger was closed for it
            await trio.sleep(0.01)
    assert not second.closed


async def test_one_identity_has_a_few_connections(nursery):
    port = await start(nursery, max_per_identity=2)
    conns = [await connected(nursery, port, PARTNER) for _ in range(3)]
    assert all(conns)
    with trio.fail_after(2):
        while not conns[0].closed:  # its oldest idle connection made room
            await trio.sleep(0.01)
    assert await conns[2].call("Ping", {})


async def test_silent_sockets_cannot_hold_the_handshake_slots(nursery):
    port = await start(nursery, max_handshakes=4, max_handshakes_per_ip=100, handshake_timeout=30)
    silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(10)]
    await trio.sleep(0.2)
    async with client(port) as conn:  # an honest peer gets through at once
        with at_once(1):
            assert await conn.call("Ping", {})
    closed = 0
    for stream in silent:  # the oldest silent ones were dropped to make room
        with trio.move_on_after(0.2):
            closed += await stream.receive_some(1) == b""
        await stream.aclose()
    assert closed >= 6


async def test_one_address_only_drops_its_own_handshakes(nursery):
    port = await start(nursery, max_handshakes_per_ip=3, handshake_timeout=30)
    silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
    with trio.fail_after(2):
        assert await silent[0].receive_some(1) == b""  # the oldest made room
    async with client(port) as conn:  # and an honest handshake gets through at once
        with at_once(1):
            assert await conn.call("Ping", {})
    for stream in silent:
        await stream.aclose()


async def test_an_address_that_connects_too_often_waits_or_is_turned_away(
    nursery, virtual_clock
):
    """An attacker dropped for every bad frame dials again at once; each handshake costs
    the node signatures. One address gets a burst, a few more wait for their turn, the
    rest are closed before any cryptography.

    On virtual time: the twelve dials arrive at one instant, however slowly a loaded
    machine accepts them (on real time, accepts spread over a second let the address's
    bucket refill, and more dials got in)."""
    port = await start(
        nursery, connect_rate_per_ip=5, connect_burst_per_ip=5, connect_queue_per_ip=3
    )
    done: list[tuple[bool, float]] = []

    async def one() -> None:
        started = trio.current_time()
        try:
            channel = await dial("127.0.0.1", port, stranger(), SERVER_PK)
        except HandshakeError:
            done.append((False, 0.0))
            return
        done.append((True, trio.current_time() - started))
        await channel.aclose()

    async with trio.open_nursery() as dials:
        for _ in range(12):
            dials.start_soon(one)
    waited = sorted(t for ok, t in done if ok)
    assert len(waited) == 8, done  # 5 at once, 3 in turn (at 5 a second), 4 turned away
    assert waited[-1] >= 0.5
    await trio.sleep(0.3)
    async with client(port) as conn:
        assert await conn.call("Ping", {})


async def test_idle_connections_are_closed_and_the_pool_dials_again(nursery, tmp_path):
    port = await start(nursery, idle_timeout=0.3)
    db = Database(tmp_path / "meta", META_TABLES)
    peers = PeerList(db, PARTNER_PK)
    peers.add(SERVER_PK, f"127.0.0.1:{port}")
    pool = Connections(PARTNER, Service(), peers)
    await nursery.start(pool.run)
    try:
        conn = await pool.get(SERVER_PK)
        assert await pool.call(SERVER_PK, "Ping", {})
        with trio.fail_after(3):
            while not conn.closed:
                await trio.sleep(0.05)
        assert conn.peer_closed  # the server closed it: idle for 0.3 s
        assert await pool.call(SERVER_PK, "Ping", {})  # a new connection
        assert pool.conns[SERVER_PK] is not conn
    finally:
        await pool.aclose()
        db.close()


async def test_a_strangers_flood_of_cheap_requests_is_paced_but_a_partner_is_not(nursery):
    service = Service()
    port = await start(nursery, service, stranger_conn_msg_rate=20.0,
                       stranger_conn_msg_burst=10, stranger_msg_rate=50.0,
                       stranger_msg_burst=20)
    ping = envelope.encode_request(1, "Ping", {})
    channels = [await dial("127.0.0.1", port, stranger(), SERVER_PK) for _ in range(4)]

    async def flood(channel) -> None:
        with contextlib.suppress(ChannelError, trio.BrokenResourceError):
            while True:
                await channel.send(ping)

    async with trio.open_nursery() as flooders:
        for channel in channels:
            flooders.start_soon(flood, channel)
        await trio.sleep(1.0)
        before = service.calls.get("Ping", 0)
        t0 = trio.current_time()
        with at_once(2.0):
            async with client(port) as conn:  # a partner is served at once meanwhile
                for _ in range(50):
                    await conn.call("Ping", {})
        await trio.sleep(1.0)
        strangers = service.calls.get("Ping", 0) - 50 - before
        flooders.cancel_scope.cancel()
    for channel in channels:
        await channel.aclose()
    # four strangers together get the node's stranger rate (50/s), not 4 x 20/s, nor
    # the thousands a second they send
    seconds = trio.current_time() - t0
    assert strangers <= 50 * seconds + 20 + 10, strangers
    assert service.calls["Ping"] <= 20 + 50 * (seconds + 1.5) + 50, service.calls
