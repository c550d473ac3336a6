"""Authenticated, encrypted message channel over any ``trio.abc.Stream`` (wire version 1).

Wire format
===========

1. Handshake (fixed-size raw messages, see ``fluidfs.net.handshake`` for the byte layout)::

       initiator -> responder   HELLO_i                 (72 bytes)
       responder -> initiator   HELLO_r || AUTH_r       (72 + 88 bytes)
       initiator -> responder   AUTH_i                  (88 bytes)

   HELLO = b"FLFS" | version u8 (=1) | role u8 | flags u16 (=0) | ephemeral X25519 pk (32)
           | Ed25519 identity pk (32).
   AUTH  = Ed25519 signature (64) over b"fluidfs-auth-v1" || role label || TH || header,
           then the sender's secretstream header (24), or on an AES channel the offer of
           AEGIS-256 frames (``framecipher.AEGIS_OFFER``).
   TH    = BLAKE2b-256(person=b"fluidfs-hs-v1", HELLO_i || HELLO_r).
   Keys  = crypto_kx session keys over the ephemeral keys, each bound to TH with keyed
           BLAKE2b-256 (person=b"fluidfs-key-v1"); one frame cipher state per direction:
           AEGIS-256 when both AUTHs offer it on an AES channel, AES-256-GCM with
           counter nonces when both HELLOs offer it (hardware AES on both ends),
           libsodium's ``crypto_secretstream_xchacha20poly1305`` otherwise
           (``fluidfs.net.framecipher`` has all three).

   Each side verifies the other's signature; the initiator may also require a specific
   identity (``expected_peer``) and refuses before signing anything itself. The whole
   handshake has a deadline (``timeout``). Any failure raises ``HandshakeError`` and closes
   the stream.

2. Frames, after the handshake, in each direction::

       +----------------------+---------------------------------------------+
       | length: u32 big-end. | ciphertext (length bytes)                    |
       +----------------------+---------------------------------------------+
       ciphertext = encrypted tag byte (1) || encrypted message || MAC (16)
       (17 bytes of overhead with secretstream or AES-256-GCM), or with AEGIS-256
       tag byte (1, in clear, authenticated) || encrypted message || MAC (32)

   ``overhead <= length <= max_frame`` (default ``MAX_FRAME`` = 8 MiB + 1024); a length outside
   that range is rejected from the 4-byte prefix alone, before any body is read or
   allocated. Tags: MESSAGE (0) for data; FINAL (3, empty message) for an orderly close.
   Every cipher's frame counting makes every tampered, replayed, reordered or
   truncated-then-resumed frame fail authentication (``FrameError``; the connection is then
   closed). End of stream at a frame boundary or a FINAL frame gives ``ChannelClosed``.

Identity keys travel in clear (no identity hiding); the payload is confidential and
forward-secret (ephemeral keys are discarded after the handshake).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Literal

import nacl.bindings as sodium
import nacl.signing
import trio
from nacl._sodium import ffi

from fluidfs.sysutil import unfilled_bytes

from . import framecipher
from . import handshake as hs
from .bandwidth import SERVE, Bandwidth, Deadline, on_wire, paused
from .errors import ChannelClosed, ChannelError, FrameError, HandshakeError
from .framecipher import MAX_OVERHEAD, FrameOpener, FrameSealer
from .streamio import ExactReader, StreamEOF

__all__ = ["MAX_FRAME", "BodyGate", "SecureChannel", "accept_channel", "connect_channel"]

#: ``before_body(message_length)`` for ``SecureChannel.receive``
BodyGate = Callable[[int], Awaitable[None]]

MAX_FRAME = 8 * 1024 * 1024 + 1024
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
# Frame buffers. Each channel keeps three buffers (send, ciphertext, plaintext) for
# frames up to KEEP_BUFFER: small, because a node has hundreds of connections. Frames
# above POOL_MIN and up to POOL_MAX (shard traffic) take buffers of POOL_MAX from one pool
# shared by all channels, last returned first out, so the buffer reused is still in the
# CPU cache: reusing hot 1 MiB buffers instead of fresh ones is worth about 40% of RPC
# throughput with 512 KiB shards (bench_net.py --mallopt, AES-GCM: 1,984 against 1,384
# MB/s). At most POOL_KEEP free buffers are kept. Other frames get exact buffers of their
# own (allocated without clearing), held only while the frame moves; strangers' frames,
# which are at most 128 KiB, are among them, so a stranger never holds a 1 MiB buffer.
# POOL_MAX has room past 1 MiB for a request's or reply's envelope around a 1 MiB shard
# (8 MiB blocks at K = 8, the default): without it those frames missed the pool.
KEEP_BUFFER = 16 << 10
POOL_MIN = 128 << 10
POOL_MAX = (1 << 20) + (16 << 10)
POOL_KEEP = 16
# Frames at least this big are en/decrypted in a worker thread, so the trio thread is not
# held for long. A thread hand-off costs about as much as AES-GCM on 512 KiB, so with that
# cipher only very large frames go (bench_net.py: RPC 1,365 MB/s offloading at 256 KiB,
# 1,984 MB/s inline); secretstream is three times slower and offloads from 256 KiB.
OFFLOAD_BY_CIPHER = {"secretstream": 256 << 10, "aes256gcm": 4 << 20, "aegis256": 4 << 20}
DEFAULT_OFFLOAD: Literal["auto"] = "auto"  # the cipher's threshold above
CLOSE_GRACE = 1.0  # seconds aclose() may spend sending the FINAL frame

_alloc = ffi.new_allocator(should_clear_after_alloc=False)
_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("fluidfs.net.crypto")


def crypto_limiter() -> trio.CapacityLimiter:
    """The per-``trio.run`` limiter for offloaded frame crypto (one thread per CPU)."""
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(os.cpu_count() or 2)
        _LIMITER.set(limiter)
        return limiter


_DEAD = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _BufferPool:
    """Free frame buffers of ``SIZE`` bytes, shared by every channel (see POOL_MIN)."""

    SIZE = POOL_MAX + 64  # room for a length prefix, tag and MAC, or an opener's offset

    def __init__(self) -> None:
        self.free: list = []

    def take(self) -> object:
        return self.free.pop() if self.free else _alloc("unsigned char[]", self.SIZE)

    def give(self, buf: object) -> None:
        if len(self.free) < POOL_KEEP:
            self.free.append(buf)


_POOL = _BufferPool()


def _pooled(n: int) -> bool:
    return POOL_MIN < n <= POOL_MAX


def buffer_cost(n: int) -> int:
    """Bytes one frame buffer takes while a message of ``n`` bytes moves (0: a channel's
    own small buffer). Receiving holds two such buffers, sending one."""
    if n <= KEEP_BUFFER:
        return 0
    return _BufferPool.SIZE if _pooled(n) else n + 64


class SecureChannel:
    """One authenticated, encrypted, framed connection. Create with ``connect_channel`` or
    ``accept_channel``.

    ``send`` may be called from many tasks at once (frames are serialised by a lock);
    ``receive`` from one task at a time. Cancelling a ``send`` or a ``receive`` that has
    started moving a frame breaks the channel (later calls raise ``ChannelClosed``).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        reader: ExactReader,
        sealer: FrameSealer,
        opener: FrameOpener,
        peer_key: bytes,
        *,
        max_frame: int,
        offload_bytes: int | Literal["auto"] | None,
        bandwidth: Bandwidth | None = None,
    ) -> None:
        self._stream = stream
        self._bandwidth = bandwidth
        self._send_waiting: list[int] = []  # priorities of senders waiting for the lock
        self._reader = reader
        self._sealer = sealer
        self._opener = opener
        self.cipher = sealer.name
        self._overhead = sealer.overhead  # both directions run the same cipher
        self.peer_key: bytes = peer_key
        self.max_frame = max_frame
        self.offload_bytes = (
            OFFLOAD_BY_CIPHER[self.cipher] if offload_bytes == "auto" else offload_bytes
        )
        self._send_lock = trio.Lock()
        self._send_error: ChannelError | None = None
        self._recv_error: ChannelError | None = None
        self._recv_busy = False
        self._closed = False
        self._hdr = memoryview(bytearray(4))
        self._sbuf = None  # reusable cffi buffers for frames up to KEEP_BUFFER
        self._rbuf = None
        self._obuf = None

    @property
    def max_message(self) -> int:
        """Largest payload ``send`` accepts (``max_frame`` minus the cipher's overhead:
        17 bytes, 33 with AEGIS-256)."""
        return self.max_frame - self._overhead

    @property
    def send_broken(self) -> bool:
        """True once an interrupted or failed send has made the outgoing stream unusable."""
        return self._send_error is not None

    # -- sending -------------------------------------------------------------------------

    async def send(
        self,
        data: bytes | bytearray | memoryview | tuple[bytes | bytearray | memoryview, ...],
        *,
        priority: int = SERVE,
        deadline: Deadline | None = None,
    ) -> None:
        """Encrypt ``data`` as one frame and send it (a tuple of buffers: their bytes one
        after the other, copied nowhere else on the way to the frame cipher).

        Under an upload limit the frame goes out in chunks, each when the node's upload
        bucket gives this ``priority`` its turn; the caller's ``deadline`` is paused while
        the frame waits for that and for frames queued ahead on this channel.

        Raises ``FrameError`` (channel still usable) if ``data`` is larger than
        ``max_message``, ``ChannelClosed`` if the connection is gone, and
        ``trio.ClosedResourceError`` after ``aclose``.
        """
        if isinstance(data, tuple):
            n = sum(memoryview(part).nbytes for part in data)
        else:
            n = memoryview(data).nbytes
        if n > self.max_message:
            raise FrameError(f"message of {n} bytes exceeds the {self.max_message}-byte limit")
        paced = self._bandwidth is not None and self._bandwidth.up.limited
        if not paced:
            async with self._send_lock:
                await self._send_frame(data, n, TAG_MESSAGE)
            return
        self._send_waiting.append(priority)
        try:
            with paused(deadline):
                await self._send_lock.acquire()
        finally:
            self._send_waiting.remove(priority)
        try:
            await self._send_frame(data, n, TAG_MESSAGE, priority, deadline)
        finally:
            self._send_lock.release()

    async def _send_frame(
        self,
        data: bytes | bytearray | memoryview | tuple[bytes | bytearray | memoryview, ...],
        n: int,
        tag: int,
        priority: int = SERVE,
        deadline: Deadline | None = None,
    ) -> None:
        if self._closed:
            raise trio.ClosedResourceError("channel was closed")
        if self._send_error is not None:
            raise ChannelClosed(str(self._send_error))
        clen = n + self._overhead
        pooled = _pooled(n)
        if n <= KEEP_BUFFER:
            if self._sbuf is None:
                self._sbuf = _alloc("unsigned char[]", KEEP_BUFFER + 4 + MAX_OVERHEAD)
            frame = self._sbuf
        else:
            frame = _POOL.take() if pooled else _alloc("unsigned char[]", clen + 4)
        try:
            if self.offload_bytes is not None and n >= self.offload_bytes:
                await trio.to_thread.run_sync(
                    self._encrypt, frame, data, n, tag, limiter=crypto_limiter()
                )
            else:
                self._encrypt(frame, data, n, tag)
            if self._bandwidth is None:
                await self._stream.send_all(ffi.buffer(frame, clen + 4))
            elif not self._bandwidth.up.limited:
                await self._stream.send_all(ffi.buffer(frame, clen + 4))
                self._bandwidth.up.count(on_wire(clen + 4))
            else:
                await self._send_paced(memoryview(ffi.buffer(frame, clen + 4)), priority, deadline)
        except _DEAD as exc:
            self._send_error = ChannelClosed("connection lost while sending")
            # raise a copy: the sticky error must not carry a traceback, whose frames
            # would keep this frame's buffer alive in a reference cycle with the channel
            raise ChannelClosed(*self._send_error.args) from exc
        except BaseException:
            self._send_error = ChannelClosed("a send was interrupted mid-frame")
            raise
        finally:
            if pooled:
                _POOL.give(frame)

    async def _send_paced(
        self, view: memoryview, priority: int, deadline: Deadline | None
    ) -> None:
        """Send *view* chunk by chunk, each when the upload bucket lets it through. A
        sender of higher priority waiting behind this frame lends it its priority."""
        assert self._bandwidth is not None
        up = self._bandwidth.up
        for pos in range(0, len(view), up.chunk):
            chunk = view[pos : pos + up.chunk]
            with paused(deadline):
                await up.take(on_wire(len(chunk)), min([priority, *self._send_waiting]))
            await self._stream.send_all(chunk)

    def _encrypt(
        self,
        frame: object,
        data: bytes | bytearray | memoryview | tuple[bytes | bytearray | memoryview, ...],
        n: int,
        tag: int,
    ) -> None:
        frame[0:4] = (n + self._overhead).to_bytes(4, "big")  # type: ignore[index]
        self._sealer.seal(frame + 4, data, n, tag)  # type: ignore[operator]

    # -- receiving -----------------------------------------------------------------------

    async def receive(
        self, before_body: BodyGate | None = None, deadline: Deadline | None = None
    ) -> bytes:
        """Return the next message.

        Under a download limit the body is read chunk by chunk, each paid for in the
        node's download bucket before the next is read; ``deadline`` (the caller's frame
        timeout) is paused meanwhile.

        ``before_body(length)``, if given, is awaited once the frame's length is known and
        checked, before its body is allocated or read: it may wait (the peer's bytes stay
        in the kernel, so TCP slows the peer down) or raise ``FrameError`` to refuse a
        frame of that size (the connection is then closed).

        Raises ``ChannelClosed`` when the peer closed (FINAL frame or end of stream at a
        frame boundary) and ``FrameError`` for a malformed, oversized, truncated, tampered,
        replayed or reordered frame (the connection is then closed). Errors are sticky.
        """
        if self._recv_error is not None:
            raise type(self._recv_error)(*self._recv_error.args)
        if self._closed:
            raise trio.ClosedResourceError("channel was closed")
        if self._recv_busy:
            raise trio.BusyResourceError("another task is already receiving on this channel")
        self._recv_busy = True
        try:
            return await self._receive_frame(before_body, deadline)
        finally:
            self._recv_busy = False

    async def _fail(self, exc: ChannelError) -> ChannelError:
        self._recv_error = type(exc)(*exc.args)  # a copy: see _send_frame
        if isinstance(exc, FrameError):
            self._send_error = ChannelClosed("closed after a bad frame from the peer")
            await trio.aclose_forcefully(self._stream)
        return exc

    async def _read(
        self,
        view: memoryview,
        what: str,
        *,
        first: bool = False,
        deadline: Deadline | None = None,
    ) -> None:
        reader = self._reader
        down = self._bandwidth.down if self._bandwidth is not None else None
        try:
            await reader.readinto(view, down, deadline)
        except StreamEOF as exc:
            if first and exc.got == 0:
                raise await self._fail(ChannelClosed("peer closed the connection")) from None
            raise await self._fail(FrameError(f"connection ended inside a frame {what}")) from None
        except _DEAD as exc:
            raise await self._fail(ChannelClosed("connection lost")) from exc
        except BaseException:
            if not (first and reader.consumed == 0):
                self._recv_error = ChannelClosed("a receive was interrupted mid-frame")
            raise

    async def _receive_frame(
        self, before_body: BodyGate | None, deadline: Deadline | None
    ) -> bytes:
        await self._read(self._hdr, "header", first=True)
        clen = int.from_bytes(self._hdr, "big")
        if clen > self.max_frame:
            raise await self._fail(
                FrameError(f"frame length {clen} exceeds the {self.max_frame}-byte limit")
            )
        if clen < self._overhead:
            raise await self._fail(FrameError(f"frame length {clen} is too short"))
        mlen = clen - self._overhead
        if before_body is not None:
            try:
                await before_body(mlen)
            except FrameError as exc:
                raise await self._fail(exc) from None
            except BaseException:
                self._recv_error = ChannelClosed("a receive was interrupted mid-frame")
                raise
        offset = self._opener.offset
        pooled = _pooled(mlen)
        if mlen <= KEEP_BUFFER:
            if self._rbuf is None:
                self._rbuf = _alloc("unsigned char[]", KEEP_BUFFER + MAX_OVERHEAD)
            buf = self._rbuf
        elif pooled:
            buf = _POOL.take()
        else:
            buf = _alloc("unsigned char[]", clen)
        # The message is decrypted straight into the bytes we return when the cipher puts
        # it at offset 0; AES-256-GCM writes the tag byte in front, so it goes through a
        # buffer and one more copy.
        message = out = None
        if offset == 0:
            message = unfilled_bytes(mlen)
            out = ffi.from_buffer("unsigned char[]", message)
        elif mlen <= KEEP_BUFFER:
            if self._obuf is None:
                self._obuf = _alloc("unsigned char[]", KEEP_BUFFER + offset)
            out = self._obuf
        else:
            out = _POOL.take() if pooled else _alloc("unsigned char[]", mlen + offset)
        try:
            tag = await self._open(buf, out, clen, deadline)
        finally:
            if pooled:
                _POOL.give(buf)
            del buf  # the ciphertext is not needed any more: at most two copies at once
        try:
            if tag == TAG_MESSAGE:
                if message is not None:
                    return message
                return ffi.buffer(out + offset, mlen)[:]
        finally:
            if pooled and message is None:
                _POOL.give(out)
        del message, out  # not filled, or not a message: nobody may see it
        if tag is None:
            raise await self._fail(
                FrameError("frame failed authentication (tampered, replayed or reordered)")
            )
        if tag == TAG_FINAL:
            raise await self._fail(ChannelClosed("peer closed the channel"))
        raise await self._fail(FrameError(f"unexpected frame tag {tag}"))

    async def _open(
        self, buf: object, out: object, clen: int, deadline: Deadline | None = None
    ) -> int | None:
        """Read a frame's body into ``buf`` and decrypt it into ``out``; return its tag."""
        view = memoryview(ffi.buffer(buf, clen))
        await self._read(view, "body", deadline=deadline)
        try:
            if self.offload_bytes is not None and clen - self._overhead >= self.offload_bytes:
                return await trio.to_thread.run_sync(
                    self._opener.open, out, view, clen, limiter=crypto_limiter()
                )
            return self._opener.open(out, view, clen)
        except BaseException:
            self._recv_error = ChannelClosed("a receive was interrupted mid-frame")
            raise

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send a FINAL frame if possible (bounded wait) and close the stream. Idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._send_error is None:
                try:
                    self._send_lock.acquire_nowait()
                except trio.WouldBlock:
                    pass  # a sender is blocked mid-frame; skip the courtesy FINAL frame
                else:
                    try:
                        with trio.move_on_after(CLOSE_GRACE, shield=True):
                            await self._send_frame(b"", 0, TAG_FINAL)
                    except (ChannelError, *_DEAD):
                        pass
                    finally:
                        self._send_lock.release()
        finally:
            self._closed = True
            await trio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> SecureChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# -- handshake ---------------------------------------------------------------------------


def _offer(aes: bool) -> int:
    """The HELLO flags we send: AES-256-GCM when wanted and this CPU can run it."""
    return hs.FLAG_AES256GCM if aes and framecipher.aes_available() else 0


def _start(role: int, identity: nacl.signing.SigningKey, aes: bool, aegis: bool) -> hs.Side:
    """Our side of a handshake, offering what we want and can run."""
    return hs.Side.start(role, identity, _offer(aes), aegis and framecipher.aegis_available())


def _open_channel(
    stream: trio.abc.Stream,
    reader: ExactReader,
    session: hs.Session,
    peer_header: bytes,
    *,
    max_frame: int,
    offload_bytes: int | Literal["auto"] | None,
    bandwidth: Bandwidth | None,
) -> SecureChannel:
    """The channel a finished handshake opens, with the frame cipher both sides offered."""
    sealer: FrameSealer
    opener: FrameOpener
    if session.aegis_agreed(peer_header):
        sealer = framecipher.AegisSealer(session.tx)
        opener = framecipher.AegisOpener(session.rx)
    elif session.flags & hs.FLAG_AES256GCM:
        sealer = framecipher.AesGcmSealer(session.tx)
        opener = framecipher.AesGcmOpener(session.rx)
    else:
        sealer = framecipher.SecretStreamSealer(session.push)
        opener = framecipher.SecretStreamOpener(hs.new_pull(session.rx, peer_header))
    return SecureChannel(
        stream,
        reader,
        sealer,
        opener,
        session.peer.identity,
        max_frame=max_frame,
        offload_bytes=offload_bytes,
        bandwidth=bandwidth,
    )


def _check_args(identity: nacl.signing.SigningKey, max_frame: int) -> None:
    if not isinstance(identity, nacl.signing.SigningKey):
        raise TypeError("identity must be a nacl.signing.SigningKey")
    if not MAX_OVERHEAD <= max_frame <= 0xFFFFFFFF:
        raise ValueError("max_frame out of range")


async def _run_handshake(
    stream: trio.abc.Stream, timeout: float, body: Callable[[], Awaitable[SecureChannel]]
) -> SecureChannel:
    try:
        with trio.fail_after(timeout):
            return await body()
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"handshake did not finish within {timeout} s") from None
    except StreamEOF:
        await trio.aclose_forcefully(stream)
        raise HandshakeError("peer closed the connection during the handshake") from None
    except _DEAD as exc:
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"connection failed during the handshake: {exc}") from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def connect_channel(
    stream: trio.abc.Stream,
    identity: nacl.signing.SigningKey,
    expected_peer: bytes | None = None,
    *,
    timeout: float = 10,
    max_frame: int = MAX_FRAME,
    offload_bytes: int | Literal["auto"] | None = DEFAULT_OFFLOAD,
    aes: bool = True,
    aegis: bool = True,
    bandwidth: Bandwidth | None = None,
) -> SecureChannel:
    """Run the initiator side of the handshake on ``stream`` and return the channel.

    ``expected_peer``: the 32-byte Ed25519 public key the peer must prove; ``None`` accepts
    any identity (read it from ``channel.peer_key``). ``offload_bytes``: frames at least
    this large are encrypted/decrypted in a worker thread (``None``: never; ``"auto"``: a
    threshold that suits the negotiated cipher). ``aes``: offer
    AES-256-GCM frames if this CPU has hardware AES (False: never; tests). ``aegis``: on
    such a channel, offer AEGIS-256 frames too (False: behave like a node from before
    AEGIS; tests and benchmarks). ``bandwidth``:
    the node's limits, which every frame of this channel then passes (None: no limits).
    Raises ``HandshakeError`` (and closes ``stream``) on any failure or after ``timeout``.
    """
    _check_args(identity, max_frame)
    if expected_peer is not None and len(expected_peer) != 32:
        raise ValueError("expected_peer must be a 32-byte Ed25519 public key")
    reader = ExactReader(stream)

    async def body() -> SecureChannel:
        me = _start(hs.ROLE_INITIATOR, identity, aes, aegis)
        await stream.send_all(me.hello)
        peer = hs.parse_hello(await reader.read_exactly(hs.HELLO_LEN), hs.ROLE_RESPONDER)
        if expected_peer is not None and not hs.same_key(peer.identity, expected_peer):
            raise HandshakeError("peer's identity is not the expected one")
        session = me.meet(peer)
        peer_header = session.check_peer_auth(await reader.read_exactly(hs.AUTH_LEN))
        await stream.send_all(session.auth())  # signed only once the responder proved itself
        return _open_channel(
            stream,
            reader,
            session,
            peer_header,
            max_frame=max_frame,
            offload_bytes=offload_bytes,
            bandwidth=bandwidth,
        )

    return await _run_handshake(stream, timeout, body)


async def accept_channel(
    stream: trio.abc.Stream,
    identity: nacl.signing.SigningKey,
    *,
    timeout: float = 10,
    max_frame: int = MAX_FRAME,
    offload_bytes: int | Literal["auto"] | None = DEFAULT_OFFLOAD,
    aes: bool = True,
    aegis: bool = True,
    bandwidth: Bandwidth | None = None,
) -> SecureChannel:
    """Run the responder side of the handshake on ``stream`` and return the channel.

    The peer's proven identity is ``channel.peer_key``; deciding whether to talk to it is
    the caller's business. ``aes``, ``aegis`` and ``bandwidth`` as for ``connect_channel``. Raises
    ``HandshakeError`` (and closes ``stream``) on failure.
    """
    _check_args(identity, max_frame)
    reader = ExactReader(stream)

    async def body() -> SecureChannel:
        peer = hs.parse_hello(await reader.read_exactly(hs.HELLO_LEN), hs.ROLE_INITIATOR)
        me = _start(hs.ROLE_RESPONDER, identity, aes, aegis)
        session = me.meet(peer)
        await stream.send_all(me.hello + session.auth())
        peer_header = session.check_peer_auth(await reader.read_exactly(hs.AUTH_LEN))
        return _open_channel(
            stream,
            reader,
            session,
            peer_header,
            max_frame=max_frame,
            offload_bytes=offload_bytes,
            bandwidth=bandwidth,
        )

    return await _run_handshake(stream, timeout, body)
