"""Secure channel: handshake, framing and the attacks it must refuse (real crypto)."""

from __future__ import annotations

import functools
import hashlib
import os
import struct

import nacl.bindings as sodium
import nacl.signing
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluidfs.net import framecipher
from fluidfs.net.channel import MAX_FRAME, SecureChannel, accept_channel, connect_channel
from fluidfs.net.errors import ChannelClosed, FrameError, HandshakeError

A = nacl.signing.SigningKey(b"a" * 32)
B = nacl.signing.SigningKey(b"b" * 32)
C = nacl.signing.SigningKey(b"c" * 32)
PK_A, PK_B, PK_C = (k.verify_key.encode() for k in (A, B, C))


CIPHERS = (
    ["aegis256", "aes256gcm", "secretstream"] if framecipher.aes_available() else ["secretstream"]
)


@pytest.fixture(autouse=True, params=CIPHERS)
def cipher(request, monkeypatch) -> str:
    """Every test here runs once per frame cipher this CPU can run; "secretstream" is what
    a machine without hardware AES negotiates, "aes256gcm" what two nodes from before
    AEGIS-256 frames do."""
    if request.param == "secretstream":
        monkeypatch.setattr(framecipher, "aes_available", lambda: False)
    if request.param == "aes256gcm":
        monkeypatch.setattr(framecipher, "aegis_available", lambda: False)
    return request.param


class TapStream(trio.abc.Stream):
    """Wraps a stream; while ``capturing``, outgoing bytes are kept instead of sent."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.capturing = False
        self.captured = bytearray()

    async def send_all(self, data) -> None:
        if self.capturing:
            self.captured += data
            await trio.lowlevel.checkpoint()
        else:
            await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def frames(self) -> list[bytes]:
        """Split the captured bytes into whole frames (length prefix included)."""
        out, buf = [], bytes(self.captured)
        while buf:
            (n,) = struct.unpack(">I", buf[:4])
            out.append(buf[: 4 + n])
            buf = buf[4 + n :]
        self.captured.clear()
        return out


async def handshake_pair(s_client, s_server, *, expected=PK_B, **kw
                         ) -> tuple[SecureChannel, SecureChannel]:
    res: dict[str, SecureChannel] = {}

    async def server() -> None:
        res["s"] = await accept_channel(s_server, B, **kw)

    async with trio.open_nursery() as n:
        n.start_soon(server)
        res["c"] = await connect_channel(s_client, A, expected, **kw)
    return res["c"], res["s"]


async def memory_pair(**kw):
    s1, s2 = trio.testing.memory_stream_pair()
    tap = TapStream(s1)
    c, s = await handshake_pair(tap, s2, **kw)
    return tap, c, s


@pytest.fixture
async def tcp_pair(nursery):
    """(client TapStream over TCP, client channel, server channel)."""
    got: trio.MemoryReceiveChannel
    send, got = trio.open_memory_channel(1)

    async def handler(stream):
        await send.send(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                      host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    tap = TapStream(await trio.open_tcp_stream("127.0.0.1", port))
    server_stream = await got.receive()
    c, s = await handshake_pair(tap, server_stream)
    yield tap, c, s
    await c.aclose()
    await s.aclose()


async def test_roundtrip_memory_and_identities(cipher):
    _, c, s = await memory_pair()
    assert c.peer_key == PK_B and s.peer_key == PK_A
    assert c.cipher == s.cipher == cipher
    for msg in (b"", b"x", os.urandom(70_000)):
        await c.send(msg)
        assert await s.receive() == msg
        await s.send(msg)
        assert await c.receive() == msg


async def test_a_message_in_parts_arrives_whole(cipher):
    """A tuple of buffers is one frame of their bytes in order (views and empty parts
    included), on either cipher."""
    tap, c, s = await memory_pair()
    block = bytearray(os.urandom(300_000))
    parts = (b"head", memoryview(block)[1000:200_000].toreadonly(), b"", bytes(block[:7]))
    await c.send(parts)
    assert await s.receive() == b"".join(bytes(p) for p in parts)
    tap.capturing = True
    await c.send((b"", b""))
    (frame,) = tap.frames()
    assert len(frame) == 4 + c._overhead  # an empty message, as b"" would be
    with pytest.raises(FrameError):
        await c.send((bytes(MAX_FRAME), b"x"))


async def test_roundtrip_tcp_large_both_ways(tcp_pair):
    _, c, s = tcp_pair
    big = os.urandom(8 * 1024 * 1024)
    mid = os.urandom(65 * 1024 + 7)
    async with trio.open_nursery() as n:
        n.start_soon(c.send, big)
        assert await s.receive() == big
    async with trio.open_nursery() as n:
        n.start_soon(s.send, big)
        assert await c.receive() == big
    for a, b in ((c, s), (s, c)):
        await a.send(mid)
        assert await b.receive() == mid
    largest = os.urandom(c.max_message)  # exactly MAX_FRAME on the wire
    assert c.max_message == MAX_FRAME - (33 if c.cipher == "aegis256" else 17)
    async with trio.open_nursery() as n:
        n.start_soon(c.send, largest)
        assert await s.receive() == largest


async def test_concurrent_senders_do_not_interleave(tcp_pair):
    _, c, s = tcp_pair
    msgs = {bytes([i]) * (100_000 + i) for i in range(20)}
    async with trio.open_nursery() as n:
        for m in msgs:
            n.start_soon(c.send, m)
        got = {await s.receive() for _ in msgs}
    assert got == msgs


async def test_wrong_expected_identity_rejected():
    s1, s2 = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(_expect_handshake_error, s2)  # the server sees the client hang up
        with pytest.raises(HandshakeError, match="expected"):
            await connect_channel(s1, A, PK_C)


async def test_accept_any_identity_when_not_expected():
    s1, s2 = trio.testing.memory_stream_pair()
    c, _ = await handshake_pair(s1, s2, expected=None)
    assert c.peer_key == PK_B


# -- a hand-written peer that follows docs/protocol.md but lies about its identity --------


def _hello(role: int, eph_pk: bytes, ident: bytes) -> bytes:
    return b"FLFS" + bytes([1, role]) + b"\0\0" + eph_pk + ident


def _th(hello_i: bytes, hello_r: bytes) -> bytes:
    return hashlib.blake2b(hello_i + hello_r, digest_size=32, person=b"fluidfs-hs-v1").digest()


def _auth(signer: nacl.signing.SigningKey, label: bytes, th: bytes) -> bytes:
    header = os.urandom(24)
    return signer.sign(b"fluidfs-auth-v1" + label + th + header).signature + header


async def test_responder_signature_by_wrong_key_rejected():
    s1, s2 = trio.testing.memory_stream_pair()

    async def liar() -> None:
        hello_i = await s2.receive_some(72)
        eph_pk, _ = sodium.crypto_kx_keypair()
        hello_r = _hello(2, eph_pk, PK_B)  # claims B, signs with C
        await s2.send_all(hello_r + _auth(C, b"responder", _th(hello_i, hello_r)))

    async with trio.open_nursery() as n:
        n.start_soon(liar)
        with pytest.raises(HandshakeError, match="signature"):
            await connect_channel(s1, A, PK_B)


async def test_responder_signature_with_wrong_role_label_rejected():
    s1, s2 = trio.testing.memory_stream_pair()

    async def reflector() -> None:
        hello_i = await s2.receive_some(72)
        eph_pk, _ = sodium.crypto_kx_keypair()
        hello_r = _hello(2, eph_pk, PK_B)
        await s2.send_all(hello_r + _auth(B, b"initiator", _th(hello_i, hello_r)))

    async with trio.open_nursery() as n:
        n.start_soon(reflector)
        with pytest.raises(HandshakeError, match="signature"):
            await connect_channel(s1, A, PK_B)


async def test_initiator_signature_by_wrong_key_rejected():
    s1, s2 = trio.testing.memory_stream_pair()

    async def liar() -> None:
        eph_pk, _ = sodium.crypto_kx_keypair()
        hello_i = _hello(1, eph_pk, PK_A)  # claims A, signs with C
        await s1.send_all(hello_i)
        reply = await s1.receive_some(72 + 88)
        while len(reply) < 72:
            reply += await s1.receive_some(72 + 88 - len(reply))
        await s1.send_all(_auth(C, b"initiator", _th(hello_i, reply[:72])))

    async with trio.open_nursery() as n:
        n.start_soon(liar)
        with pytest.raises(HandshakeError, match="signature"):
            await accept_channel(s2, B)


async def test_substituted_ephemeral_key_rejected():
    """A man in the middle swapping the responder's ephemeral key breaks the transcript."""
    c_side, mitm_c = trio.testing.memory_stream_pair()
    mitm_s, s_side = trio.testing.memory_stream_pair()

    async def mitm() -> None:
        await mitm_s.send_all(await mitm_c.receive_some(72))
        data = b""
        while len(data) < 160:
            data += await mitm_s.receive_some(160 - len(data))
        evil_pk, _ = sodium.crypto_kx_keypair()
        await mitm_c.send_all(data[:8] + evil_pk + data[40:])
        assert await mitm_c.receive_some() == b""  # the client hangs up ...
        await mitm_s.aclose()  # ... and so do we

    async with trio.open_nursery() as n:
        n.start_soon(mitm)
        n.start_soon(functools.partial(_expect_handshake_error, s_side))
        with pytest.raises(HandshakeError, match="signature"):
            await connect_channel(c_side, A, PK_B)


async def _expect_handshake_error(stream) -> None:
    with pytest.raises(HandshakeError):
        await accept_channel(stream, B, timeout=2)


@pytest.mark.parametrize(("hello", "why"), [
    (b"GET / HTTP/1.1\r\n" + b"x" * 56, "not speaking"),
    (b"FLFS\x02\x01\0\0" + bytes(64), "version 2"),
    (b"FLFS\x01\x02\0\0" + bytes(64), "role"),
    (b"FLFS\x01\x01\0\0" + bytes(32) + PK_A, "ephemeral"),  # low-order X25519 point
])
async def test_bad_hello_rejected(hello, why):
    s1, s2 = trio.testing.memory_stream_pair()
    await s1.send_all(hello)
    with pytest.raises(HandshakeError, match=why):
        await accept_channel(s2, B)


@pytest.mark.parametrize(("client", "server"), [
    (True, True), (True, False), (False, True), (False, False),
])
async def test_cipher_is_aes_only_when_both_offer_it(cipher, client, server):
    agreed = cipher if client and server and cipher != "secretstream" else "secretstream"
    s1, s2 = trio.testing.memory_stream_pair()
    res = {}

    async def serve() -> None:
        res["s"] = await accept_channel(s2, B, aes=server)

    async with trio.open_nursery() as n:
        n.start_soon(serve)
        c = await connect_channel(s1, A, PK_B, aes=client)
    assert c.cipher == res["s"].cipher == agreed
    for msg in (b"ping", os.urandom(300_000)):
        await c.send(msg)
        assert await res["s"].receive() == msg
        await res["s"].send(msg)
        assert await c.receive() == msg


async def test_unknown_hello_flags_rejected():
    s1, s2 = trio.testing.memory_stream_pair()
    await s1.send_all(b"FLFS\x01\x01\x80\x00" + bytes(64))
    with pytest.raises(HandshakeError, match="unknown handshake flags"):
        await accept_channel(s2, B)


async def test_handshake_timeout():
    s1, _s2 = trio.testing.memory_stream_pair()  # nobody answers
    with trio.fail_after(5), pytest.raises(HandshakeError, match="within"):
        await connect_channel(s1, A, PK_B, timeout=0.2)


async def test_peer_eof_during_handshake():
    s1, s2 = trio.testing.memory_stream_pair()
    await s2.aclose()
    with pytest.raises(HandshakeError):
        await connect_channel(s1, A, PK_B)


# -- frame attacks -------------------------------------------------------------------------


async def _capture(tap: TapStream, channel: SecureChannel, *msgs: bytes) -> list[bytes]:
    tap.capturing = True
    for m in msgs:
        await channel.send(m)
    tap.capturing = False
    return tap.frames()


async def _assert_rejected_and_closed(receiver: SecureChannel, match: str) -> None:
    with trio.fail_after(5), pytest.raises(FrameError, match=match):
        await receiver.receive()
    with pytest.raises(FrameError):  # sticky
        await receiver.receive()
    with pytest.raises(ChannelClosed):
        await receiver.send(b"after")


@pytest.mark.parametrize("where", ["tag", "body", "mac"])
async def test_tampered_frame_rejected(where):
    tap, c, s = await memory_pair()
    (frame,) = await _capture(tap, c, b"pay me 100")
    bad = bytearray(frame)
    bad[{"tag": 4, "body": 8, "mac": len(frame) - 1}[where]] ^= 1
    await tap.inner.send_all(bad)
    await _assert_rejected_and_closed(s, "authentication")


async def test_tampered_frame_rejected_tcp(tcp_pair):
    tap, c, s = tcp_pair
    (frame,) = await _capture(tap, c, os.urandom(100_000))
    bad = bytearray(frame)
    bad[50_000] ^= 0x80
    await tap.inner.send_all(bad)
    await _assert_rejected_and_closed(s, "authentication")


async def test_replayed_frame_rejected():
    tap, c, s = await memory_pair()
    (frame,) = await _capture(tap, c, b"once")
    await tap.inner.send_all(frame)
    assert await s.receive() == b"once"
    await tap.inner.send_all(frame)
    await _assert_rejected_and_closed(s, "replayed")


async def test_reordered_frames_rejected():
    tap, c, s = await memory_pair()
    f1, f2 = await _capture(tap, c, b"first", b"second")
    await tap.inner.send_all(f2 + f1)
    await _assert_rejected_and_closed(s, "reordered")


async def test_dropped_frame_rejected():
    tap, c, s = await memory_pair()
    _f1, f2 = await _capture(tap, c, b"first", b"second")
    await tap.inner.send_all(f2)
    await _assert_rejected_and_closed(s, "authentication")


async def test_oversized_length_rejected_before_body_tcp(tcp_pair):
    tap, _c, s = tcp_pair
    await tap.inner.send_all(struct.pack(">I", MAX_FRAME + 1))  # no body follows
    await _assert_rejected_and_closed(s, "exceeds")


@pytest.mark.parametrize("length", [0, 16, "overhead-1", 1025, 0xFFFFFFFF])
async def test_bad_length_rejected_custom_limit(length):
    tap, _c, s = await memory_pair(max_frame=1024)
    if length == "overhead-1":  # 32 with AEGIS-256: as long as its MAC, shorter than a frame
        length = s._overhead - 1
    await tap.inner.send_all(struct.pack(">I", length))
    await _assert_rejected_and_closed(s, "too short|exceeds")


async def test_send_too_large_is_local_error():
    _, c, s = await memory_pair(max_frame=1024)
    overhead = 33 if c.cipher == "aegis256" else 17
    with pytest.raises(FrameError, match="limit"):
        await c.send(bytes(1024 - overhead + 1))
    await c.send(bytes(1024 - overhead))  # still usable; the biggest message that fits
    assert len(await s.receive()) == 1024 - overhead


async def test_truncated_frame_rejected():
    tap, c, s = await memory_pair()
    (frame,) = await _capture(tap, c, b"x" * 100)
    await tap.inner.send_all(frame[:50])
    await tap.inner.aclose()
    await _assert_rejected_and_closed(s, "ended inside")


async def test_clean_close_and_eof():
    _, c, s = await memory_pair()
    await c.send(b"last")
    await c.aclose()
    assert await s.receive() == b"last"
    with pytest.raises(ChannelClosed):
        await s.receive()
    with pytest.raises(trio.ClosedResourceError):
        await c.send(b"x")
    tap, _c2, s2 = await memory_pair()
    await tap.inner.aclose()  # EOF at a frame boundary, no FINAL frame
    with pytest.raises(ChannelClosed):
        await s2.receive()


async def test_cancelled_idle_receive_keeps_channel():
    _, c, s = await memory_pair()
    with trio.move_on_after(0.01):
        await s.receive()
    await c.send(b"still fine")
    assert await s.receive() == b"still fine"


async def test_offloaded_crypto_roundtrip():
    _, c, s = await memory_pair(offload_bytes=1)
    async with trio.open_nursery() as n:
        n.start_soon(c.send, b"thread" * 1000)
        assert await s.receive() == b"thread" * 1000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.binary(min_size=1, max_size=200))
def test_random_bytes_after_handshake_give_clean_errors(junk):
    async def main() -> None:
        tap, _c, s = await memory_pair()
        await tap.inner.send_all(junk)
        await tap.inner.aclose()
        with trio.fail_after(5), pytest.raises((FrameError, ChannelClosed)):
            await s.receive()

    trio.run(main)


# -- AEGIS-256 frames: negotiation, downgrade, sizes ---------------------------------------

needs_aes = pytest.mark.skipif(not framecipher.aes_available(), reason="no hardware AES")


@needs_aes
@pytest.mark.parametrize("cipher", ["aegis256"], indirect=True)  # nodes that offer it
@pytest.mark.parametrize(("client", "server"), [
    (True, True), (True, False), (False, True), (False, False),
])
async def test_aegis_only_when_both_auths_offer_it(cipher, client, server):
    """A node from before AEGIS (aegis=False) on either side keeps AES-256-GCM; the
    offer travels only on AES channels."""
    s1, s2 = trio.testing.memory_stream_pair()
    res = {}

    async def serve() -> None:
        res["s"] = await accept_channel(s2, B, aegis=server)

    async with trio.open_nursery() as n:
        n.start_soon(serve)
        c = await connect_channel(s1, A, PK_B, aegis=client)
    agreed = "aegis256" if client and server else "aes256gcm"
    assert c.cipher == res["s"].cipher == agreed
    for msg in (b"", b"ping", os.urandom(300_000)):
        await c.send(msg)
        assert await res["s"].receive() == msg
        await res["s"].send(msg)
        assert await c.receive() == msg


class _AuthRewriter:
    """A man in the middle that forwards a handshake, rewriting the 24-byte header of
    one side's AUTH (``"responder"``: bytes 136..160 of its reply; ``"initiator"``: the
    last 24 bytes of its AUTH), then relays everything else."""

    def __init__(self, side: str, new_header: bytes) -> None:
        self.side = side
        self.new_header = new_header
        self.seen: bytes | None = None

    async def run(self, mitm_c, mitm_s) -> None:
        async def exactly(stream, n: int) -> bytes:
            data = b""
            while len(data) < n:
                got = await stream.receive_some(n - len(data))
                if not got:
                    raise trio.BrokenResourceError
                data += got
            return data

        with trio.move_on_after(5):
            try:
                await mitm_s.send_all(await exactly(mitm_c, 72))
                reply = await exactly(mitm_s, 160)
                if self.side == "responder":
                    self.seen = reply[136:]
                    reply = reply[:136] + self.new_header
                await mitm_c.send_all(reply)
                auth = await exactly(mitm_c, 88)
                if self.side == "initiator":
                    self.seen = auth[64:]
                    auth = auth[:64] + self.new_header
                await mitm_s.send_all(auth)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await mitm_c.aclose()
        await mitm_s.aclose()


@needs_aes
@pytest.mark.parametrize("cipher", ["aegis256"], indirect=True)  # two nodes offering it
@pytest.mark.parametrize("side", ["responder", "initiator"])
async def test_stripped_aegis_offer_fails_auth(cipher, side):
    """Replacing a node's AEGIS offer with a header (to force AES-256-GCM) breaks that
    node's signature: the handshake fails instead of being downgraded."""
    c_side, mitm_c = trio.testing.memory_stream_pair()
    mitm_s, s_side = trio.testing.memory_stream_pair()
    mitm = _AuthRewriter(side, os.urandom(24))
    errors = []

    async def server() -> None:
        try:
            await accept_channel(s_side, B, timeout=2)
        except HandshakeError as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(mitm.run, mitm_c, mitm_s)
        n.start_soon(server)
        if side == "responder":  # the initiator checks the responder's AUTH
            with pytest.raises(HandshakeError, match="signature"):
                await connect_channel(c_side, A, PK_B, timeout=2)
        else:  # the initiator is done; the responder refuses it and hangs up
            c = await connect_channel(c_side, A, PK_B, timeout=2)
            with pytest.raises(ChannelClosed):
                await c.receive()
    assert mitm.seen == framecipher.AEGIS_OFFER
    if side == "initiator":
        assert len(errors) == 1 and "signature" in str(errors[0])


@needs_aes
@pytest.mark.parametrize("cipher", ["aes256gcm"], indirect=True)  # nodes that do not offer it
async def test_forged_aegis_offer_fails_auth(cipher):
    """Putting the offer into an old node's AUTH fails that AUTH's signature too."""
    c_side, mitm_c = trio.testing.memory_stream_pair()
    mitm_s, s_side = trio.testing.memory_stream_pair()
    mitm = _AuthRewriter("responder", framecipher.AEGIS_OFFER)

    async with trio.open_nursery() as n:
        n.start_soon(mitm.run, mitm_c, mitm_s)
        n.start_soon(functools.partial(_expect_handshake_error, s_side))
        with pytest.raises(HandshakeError, match="signature"):
            await connect_channel(c_side, A, PK_B, timeout=2)
    assert mitm.seen != framecipher.AEGIS_OFFER


def test_aegis_offer_only_on_aes_channels():
    """The offer replaces the secretstream header only when both HELLOs chose AES: on a
    secretstream channel that header is needed."""
    from fluidfs.net import handshake as hs

    def headers(flags_i: int, flags_r: int) -> tuple[bytes, bytes]:
        i = hs.Side.start(hs.ROLE_INITIATOR, A, flags_i, aegis=True)
        r = hs.Side.start(hs.ROLE_RESPONDER, B, flags_r, aegis=True)
        si = i.meet(hs.parse_hello(r.hello, hs.ROLE_RESPONDER))
        sr = r.meet(hs.parse_hello(i.hello, hs.ROLE_INITIATOR))
        return si.header, sr.header

    aes = hs.FLAG_AES256GCM
    assert headers(aes, aes) == (framecipher.AEGIS_OFFER, framecipher.AEGIS_OFFER)
    for flags in ((aes, 0), (0, aes), (0, 0)):
        assert framecipher.AEGIS_OFFER not in headers(*flags)


def _boundary_sizes(max_message: int) -> list[int]:
    from fluidfs.net import channel as ch

    sizes = {0, 1, max_message - 1, max_message}
    for edge in (ch.KEEP_BUFFER, ch.POOL_MIN, ch.POOL_MAX, 4 << 20):
        sizes |= {edge - 1, edge, edge + 1}
    return sorted(sizes)


@pytest.mark.parametrize("offload", [None, 200_000])
async def test_roundtrip_at_every_buffer_boundary(cipher, offload):
    """Messages on either side of the keep-buffer, pool and offload edges and at the
    largest size come back whole, as bytes, on each cipher; a pooled buffer reused by a
    later, shorter message leaks nothing of the one before."""
    _, c, s = await memory_pair(offload_bytes=offload)
    for n in _boundary_sizes(c.max_message):
        msg = os.urandom(n)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.send, msg)
            got = await s.receive()
        assert type(got) is bytes and got == msg, n


async def test_unexpected_tag_from_peer_is_refused(cipher):
    """An authentic frame with a tag we never send ends the channel, not the node."""
    _, c, s = await memory_pair()
    async with c._send_lock:
        await c._send_frame(b"odd", 3, 7)
    with trio.fail_after(5), pytest.raises(FrameError, match="unexpected frame tag 7"):
        await s.receive()
    with pytest.raises(FrameError):
        await s.receive()


async def test_frame_cut_inside_the_mac_is_refused(cipher):
    tap, c, s = await memory_pair()
    (frame,) = await _capture(tap, c, b"y" * 1000)
    await tap.inner.send_all(frame[:-10])  # message whole, MAC short
    await tap.inner.aclose()
    await _assert_rejected_and_closed(s, "ended inside")


def test_a_default_blocks_shard_travels_in_a_pooled_buffer():
    """The largest StoreShard request and RetrieveShard reply carrying one shard of a
    default-sized block (K = 8) fit the frame pool's buffers: shard traffic reuses hot
    buffers instead of allocating one per frame. Fails on the code before, whose pool
    stopped at 1 MiB, a hair short of an 8 MiB block's 1 MiB shard and its envelope."""
    from fluidfs import keys
    from fluidfs.blocks.codec import BlockCodec
    from fluidfs.net import channel as ch
    from fluidfs.net import envelope
    from fluidfs.net.messages import MAX_DELEGATION
    from fluidfs.node.config import DEFAULT_BLOCK_SIZE

    ring = keys.KeyRing(keys.generate())
    codec = BlockCodec(dedup_key=ring.dedup_key, wrap_key=ring.wrap_key,
                       needed=ring.keyfile.shards_needed, total=ring.keyfile.shards_total)
    data = os.urandom(DEFAULT_BLOCK_SIZE)
    record, shards = codec.seal(data, codec.block_id(data))
    shard = bytes(max(shards, key=len))
    # As RemoteShards sends it (the shard after the rest, without a copy), routed
    # through a provider (``for`` in front), and with the largest delegation.
    head, tail = envelope.encode_request_parts(
        2**63 - 1, "StoreShard",
        {"for": os.urandom(32), "delegation": os.urandom(MAX_DELEGATION),
         "shards": [{"id": record.shard_ids[0], "data": envelope.TAIL}]},
        shard,
    )
    request = len(head) + len(tail)
    reply = len(envelope.encode_ok(2**63 - 1, {"data": shard}))
    for message in (request, reply):
        assert ch._pooled(message), (message, ch.POOL_MAX)
