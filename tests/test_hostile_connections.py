"""A real `fluidfs serve` under hostile connections: memory stays bounded, caps hold, and
honest peers (strangers and partners) keep being served.

The attackers speak the real protocol (real handshakes, real frame crypto) from this
process; the node is a separate process whose memory is read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import struct

import cbor2
import nacl.signing
import pytest
import trio
from peerhelpers import Peer

from fluidfs.blocks import merkle
from fluidfs.net import envelope
from fluidfs.net.channel import SecureChannel
from fluidfs.net.errors import ChannelError, HandshakeError, RpcConnectionLost
from fluidfs.net.limits import DEFAULT_LIMITS
from fluidfs.net.rpc import RpcConnection
from fluidfs.net.tcp import dial, open_rpc

MIB = 1 << 20


def endpoint(peer: Peer) -> tuple[str, int]:
    host, port = peer.addr.rsplit(":", 1)
    return host, int(port)


def memory_kib(peer: Peer) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of the peer process, KiB."""
    assert peer.proc is not None
    fields = {}
    with open(f"/proc/{peer.proc.pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields


def request(rid: int, op: str, args: bytes) -> bytes:
    """A request envelope with raw CBOR ``args`` (for args no encoder would make)."""
    parts = [cbor2.dumps(x) for x in ("v", 1, "id", rid, "op", op, "args")]
    return b"\xa4" + b"".join(parts) + args


def empty_maps(n: int) -> bytes:
    """``{"x": [{}, ...]}``: one wire byte per map, about 72 bytes once decoded."""
    return b"\xa1" + cbor2.dumps("x") + b"\x9a" + n.to_bytes(4, "big") + b"\xa0" * n


STRANGER_FRAMES = [
    request(1, "DeleteShard", empty_maps(120_000)),  # just under the small-frame limit
    request(2, "Ping", b"\xa1" + cbor2.dumps("x") + b"\x81" * 100_000 + b"\x00"),  # deep
    request(3, "ShareNewPeers", cbor2.dumps({"max": 256})),  # replies it never reads
    request(4, "RetrieveShard", cbor2.dumps({"id": bytes(32)})),
]


async def flood(
    port: int, frames: list[bytes], stop: trio.Event, key=None, header: bool = False
) -> None:
    """Send ``frames`` round and round without reading a reply; dial again when dropped.

    ``header``: also announce an 8 MiB frame (then never send it) on every connection.
    """
    while not stop.is_set():
        try:
            channel = await dial("127.0.0.1", port, key or nacl.signing.SigningKey.generate())
        except (HandshakeError, ChannelError):
            await trio.sleep(0.05)
            continue
        with contextlib.suppress(ChannelError, trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(1):  # a new identity every second
                while not stop.is_set():
                    for frame in frames:
                        await channel.send(frame)
                    if header:
                        await channel._stream.send_all(struct.pack(">I", 8 * MIB))
                        break
        await trio.aclose_forcefully(channel._stream)


@contextlib.asynccontextmanager
async def connect(port: int, key: nacl.signing.SigningKey):
    """An RPC connection to the node, dialling again for up to 5 s if the node turns us
    away (as a node's pool does after its back-off): the attackers share our address,
    and the node limits how often one address may connect."""
    deadline = trio.current_time() + 5
    while True:
        try:
            channel = await dial("127.0.0.1", port, key)
            break
        except (HandshakeError, ChannelError):
            if trio.current_time() > deadline:
                raise
            await trio.sleep(0.2)
    conn = RpcConnection(channel)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            yield conn
        finally:
            await conn.aclose()


async def make_partner(port: int, key: nacl.signing.SigningKey) -> None:
    async with connect(port, key) as conn:
        reply = await conn.call(
            "ProposeAgreement", {"offer": 64 * MIB, "ask": 32 * MIB, "term": 3600}
        )
        assert reply["accepted"], reply


async def honest_partner_round_trip(port: int, key: nacl.signing.SigningKey) -> None:
    data = os.urandom(1 * MIB)
    sid = merkle.shard_id(data)
    async with connect(port, key) as conn:
        stored = await conn.call("StoreShard", {"shards": [{"id": sid, "data": data}]})
        assert stored["stored"] == [sid], stored
        assert (await conn.call("RetrieveShard", {"id": sid}))["data"] == data


async def honest_stranger_ping(port: int) -> None:
    async with connect(port, nacl.signing.SigningKey.generate()) as conn:
        assert (await conn.call("Ping", {}))["time"] > 0


@pytest.fixture
def peer(tmp_path):
    made = Peer(tmp_path, "node", donate="2G")
    yield made
    made.kill()


def test_memory_stays_bounded_under_the_worst_frames(peer):
    """Eight strangers and a partner send frames of tiny items, deep nesting, floods of
    calls they never read and frames they never finish; the node's peak RSS grows by less
    than 100 MB (one such frame used to decode to 72 MB), and an honest stranger and an
    honest partner are served meanwhile."""
    peer.start()
    port = endpoint(peer)[1]
    partner = nacl.signing.SigningKey.generate()
    hostile_partner = nacl.signing.SigningKey.generate()

    async def main() -> None:
        await make_partner(port, partner)
        await make_partner(port, hostile_partner)
        await honest_stranger_ping(port)
        before = memory_kib(peer)["VmRSS"]
        stop = trio.Event()
        partner_flood = [request(5, "StoreShard", empty_maps(8 * MIB - 64))]
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(flood, port, STRANGER_FRAMES, stop, None, i % 2 == 0)
            nursery.start_soon(flood, port, partner_flood, stop, hostile_partner)
            await trio.sleep(2)  # on purpose: the attack is under way before we check
            with trio.fail_after(20):
                await honest_stranger_ping(port)
                await honest_partner_round_trip(port, partner)
            await trio.sleep(1)  # on purpose: the attack goes on a while after we were served
            stop.set()
        peak = memory_kib(peer)["VmHWM"]
        assert peer.proc.poll() is None, peer.log()
        assert (peak - before) * 1024 < 100e6, f"peak RSS grew by {(peak - before) / 1024:.0f} MiB"
        await honest_partner_round_trip(port, partner)

    trio.run(main)


def test_strangers_per_address_are_capped_and_a_partner_still_gets_in(peer):
    """More stranger connections from one address than its cap: the node never holds more
    than the cap of them, while a partner on the same address connects and calls."""
    peer.start()
    port = endpoint(peer)[1]
    partner = nacl.signing.SigningKey.generate()
    cap = DEFAULT_LIMITS.max_strangers_per_ip

    async def main() -> None:
        await make_partner(port, partner)
        channels: list[SecureChannel] = []
        ping = envelope.encode_request(1, "Ping", {})
        for _ in range(cap + 8):
            with contextlib.suppress(HandshakeError, ChannelError):
                channel = await dial("127.0.0.1", port, nacl.signing.SigningKey.generate())
                channels.append(channel)
        open_ = 0
        for channel in channels:  # which of them does the node still answer?
            with contextlib.suppress(ChannelError), trio.move_on_after(2):
                await channel.send(ping)
                await channel.receive()
                open_ += 1
        assert open_ <= cap, f"{open_} stranger connections from one address"
        assert len(channels) - open_ >= 8
        with trio.fail_after(10):
            await honest_partner_round_trip(port, partner)
        for channel in channels:
            await trio.aclose_forcefully(channel._stream)

    trio.run(main)


def test_an_idle_connection_is_closed(peer):
    peer.extra = ["--net-limits", "idle_timeout=1"]
    peer.start()
    port = endpoint(peer)[1]

    async def main() -> None:
        async with open_rpc("127.0.0.1", port, nacl.signing.SigningKey.generate()) as conn:
            assert await conn.call("Ping", {})
            await trio.sleep(0.5)  # on purpose: half the idle timeout passes
            assert await conn.call("Ping", {})  # activity keeps it open
            with trio.fail_after(5):
                while not conn.closed:
                    await trio.sleep(0.05)
            assert conn.peer_closed
            with pytest.raises(RpcConnectionLost):
                await conn.call("Ping", {})
        await honest_stranger_ping(port)

    trio.run(main)


def test_a_handshake_flood_does_not_lock_out_honest_peers(peer):
    """Two hundred sockets that never finish the handshake, from the honest peers' own
    address: the node closes all but a few at once (its per-address rate and handshake
    caps), and an honest peer at that address gets in within a second."""
    peer.start()
    port = endpoint(peer)[1]

    async def main() -> None:
        silent = []
        for _ in range(200):
            silent.append(await trio.open_tcp_stream("127.0.0.1", port))
        with trio.fail_after(1):
            await honest_stranger_ping(port)
        dropped = 0
        for stream in silent:
            with trio.move_on_after(0.01), contextlib.suppress(trio.BrokenResourceError):
                dropped += await stream.receive_some(1) == b""
            await stream.aclose()
        assert dropped >= 200 - DEFAULT_LIMITS.max_handshakes_per_ip

    trio.run(main)
