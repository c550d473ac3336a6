"""The three frame ciphers a secure channel can run, one state per direction.

Each turns a (tag byte, message) pair into a frame body of ``len(message) + overhead``
bytes (17 for the first two, 33 for AEGIS-256; ``SecureChannel.max_message`` follows the
channel's cipher), and each binds every frame to its position in the stream: a tampered,
replayed, reordered or dropped frame fails to decrypt.

* ``secretstream``: libsodium's ``crypto_secretstream_xchacha20poly1305`` (the tag is
  secretstream's own). Runs everywhere; about 1.5 GB/s on the CPUs we measured.
* ``aes256gcm``: AES-256-GCM with a 96-bit nonce of four zero bytes followed by a 64-bit
  big-endian frame counter (starting at 0 in each direction); the tag byte is encrypted
  in front of the message. Only with hardware AES and carry-less multiply
  (``crypto_aead_aes256gcm_is_available``); about three times faster than secretstream,
  which matters because bulk shard traffic is mostly frame crypto.
* ``aegis256`` (frame format 1): AEGIS-256 (``crypto_aead_aegis256``, also built on the
  AES round instructions) with a 256-bit nonce of 24 zero bytes followed by the 64-bit
  big-endian frame counter. The tag byte goes in clear in front of the ciphertext and is
  authenticated as associated data, so the message decrypts on its own into the object the
  receiver returns (no copy after decryption); the MAC is 32 bytes. Several times faster
  than AES-256-GCM on the same CPU.

Which one a channel uses is settled in the handshake (``fluidfs.net.handshake``): each
HELLO says whether its sender can run AES-256-GCM, and both must say so; on such a
channel each AUTH then either carries ``AEGIS_OFFER`` in place of its unused secretstream
header or not, and AEGIS-256 is used only when both do. HELLOs and AUTH headers are
signed, so the choice cannot be downgraded by a third party.

All functions here may run in a worker thread; a state is used by one thread at a time
(the channel serialises each direction).
"""

from __future__ import annotations

from typing import Protocol, TypeAlias

import nacl.bindings as sodium
from nacl._sodium import ffi, lib  # direct calls: the bindings copy every frame twice

ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES  # 17 = tag byte + MAC
MAC_BYTES = 16
AEGIS_MAC_BYTES = 32
AEGIS_OVERHEAD = 1 + AEGIS_MAC_BYTES  # clear tag byte + MAC
MAX_OVERHEAD = AEGIS_OVERHEAD
#: what an AUTH carries instead of a secretstream header to offer AEGIS-256 frames
#: (format 1); a later frame format gets a marker of its own
AEGIS_OFFER = b"fluidfs aegis256 frames\0"
assert len(AEGIS_OFFER) == sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES

#: a frame's message: one buffer, or several whose bytes follow one another
Message: TypeAlias = bytes | bytearray | memoryview | tuple[bytes | bytearray | memoryview, ...]


def aes_available() -> bool:
    """Can this machine run AES-256-GCM frames (AES-NI and PCLMUL present)?"""
    return bool(lib.crypto_aead_aes256gcm_is_available())


def aegis_available() -> bool:
    """Does our libsodium have AEGIS-256 (1.0.19 and later)? It runs on the AES round
    instructions that ``aes_available`` checks for, so we offer it only beside AES."""
    return hasattr(lib, "crypto_aead_aegis256_encrypt")


class FrameSealer(Protocol):
    """Encrypts the outgoing frames of one direction."""

    #: the cipher's name as ``SecureChannel.cipher`` reports it
    name: str
    #: bytes a frame body has beyond its message
    overhead: int

    def seal(self, out: object, data: Message, n: int, tag: int) -> None:
        """Write the ``n + overhead`` bytes of (tag, data)'s frame body at cffi pointer *out*."""


class FrameOpener(Protocol):
    """Decrypts the incoming frames of one direction."""

    #: where the message starts in *out* after ``open`` (*out* needs this many spare
    #: bytes); 0 lets the receiver decrypt straight into the object it returns
    offset: int
    #: bytes a frame body has beyond its message
    overhead: int

    def open(self, out: object, frame: memoryview, clen: int) -> int | None:
        """Decrypt *frame* (``clen`` bytes) into *out*; the message is the
        ``clen - overhead`` bytes from ``out + offset``. Return the tag, or None if the
        frame fails authentication."""


class SecretStreamSealer:
    """Outgoing frames with crypto_secretstream_xchacha20poly1305."""

    name = "secretstream"
    overhead = ABYTES

    def __init__(self, state: sodium.crypto_secretstream_xchacha20poly1305_state) -> None:
        self._state = state.statebuf

    def seal(self, out: object, data: Message, n: int, tag: int) -> None:
        if isinstance(data, tuple):  # secretstream reads one buffer: join the parts
            data = b"".join(data)
        src = ffi.from_buffer(data) if n else ffi.NULL
        rc = lib.crypto_secretstream_xchacha20poly1305_push(
            self._state, out, ffi.NULL, src, n, ffi.NULL, 0, tag
        )
        if rc != 0:  # pragma: no cover - libsodium never fails here
            raise RuntimeError("secretstream encryption failed")


class SecretStreamOpener:
    """Incoming frames with crypto_secretstream_xchacha20poly1305."""

    offset = 0
    overhead = ABYTES

    def __init__(self, state: sodium.crypto_secretstream_xchacha20poly1305_state) -> None:
        self._state = state.statebuf
        self._tag = ffi.new("unsigned char *")

    def open(self, out: object, frame: memoryview, clen: int) -> int | None:
        rc = lib.crypto_secretstream_xchacha20poly1305_pull(
            self._state, out, ffi.NULL, self._tag, ffi.from_buffer(frame), clen, ffi.NULL, 0
        )
        return None if rc != 0 else self._tag[0]


class _Counter:
    """The per-direction frame counter behind the AES-GCM and AEGIS nonces: zero bytes
    then the counter, big-endian, in its last 8 bytes."""

    NONCE_ZEROS = b"\0" * 4

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the frame ciphers need a 32-byte key")
        self._key = key
        self._count = 0

    def next_nonce(self) -> bytes:
        nonce = self.NONCE_ZEROS + self._count.to_bytes(8, "big")
        self._count += 1
        return nonce


class AesGcmSealer(_Counter):
    """Outgoing frames with AES-256-GCM and counter nonces."""

    name = "aes256gcm"
    overhead = ABYTES

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self._clen = ffi.new("unsigned long long *")

    def seal(self, out: object, data: Message, n: int, tag: int) -> None:
        # tag || data is assembled where the ciphertext goes and encrypted in place
        # (libsodium allows c == m), which costs one memcpy instead of a temporary copy.
        out = ffi.cast("unsigned char *", out)
        out[0] = tag
        at = 1
        for part in data if isinstance(data, tuple) else (data,):
            size = memoryview(part).nbytes
            if size:
                ffi.memmove(out + at, ffi.from_buffer(part), size)
                at += size
        assert at == n + 1
        rc = lib.crypto_aead_aes256gcm_encrypt(
            out, self._clen, out, n + 1, ffi.NULL, 0, ffi.NULL, self.next_nonce(), self._key
        )
        if rc != 0:  # pragma: no cover - libsodium never fails here
            raise RuntimeError("AES-256-GCM encryption failed")


class AesGcmOpener(_Counter):
    """Incoming frames with AES-256-GCM and counter nonces."""

    offset = 1  # out gets tag || message
    overhead = ABYTES

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self._mlen = ffi.new("unsigned long long *")

    def open(self, out: object, frame: memoryview, clen: int) -> int | None:
        src = ffi.from_buffer(frame)
        rc = lib.crypto_aead_aes256gcm_decrypt(
            out, self._mlen, ffi.NULL, src, clen, ffi.NULL, 0, self.next_nonce(), self._key
        )
        if rc != 0:
            return None
        return out[0]


class AegisSealer(_Counter):
    """Outgoing frames with AEGIS-256 (format 1): ``tag || ciphertext || MAC``, the tag
    byte in clear and authenticated as associated data."""

    name = "aegis256"
    overhead = AEGIS_OVERHEAD
    NONCE_ZEROS = b"\0" * 24

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self._clen = ffi.new("unsigned long long *")
        self._ad = ffi.new("unsigned char[1]")

    def seal(self, out: object, data: Message, n: int, tag: int) -> None:
        out = ffi.cast("unsigned char *", out)
        out[0] = tag
        self._ad[0] = tag
        body = out + 1
        if isinstance(data, tuple):  # gather the parts where the ciphertext goes
            at = 0
            for part in data:
                size = memoryview(part).nbytes
                if size:
                    ffi.memmove(body + at, ffi.from_buffer(part), size)
                    at += size
            assert at == n
            src = body
        else:
            src = ffi.from_buffer(data) if n else body
        rc = lib.crypto_aead_aegis256_encrypt(
            body, self._clen, src, n, self._ad, 1, ffi.NULL, self.next_nonce(), self._key
        )
        if rc != 0:  # pragma: no cover - libsodium never fails here
            raise RuntimeError("AEGIS-256 encryption failed")


class AegisOpener(_Counter):
    """Incoming frames with AEGIS-256 (format 1, see ``AegisSealer``)."""

    offset = 0  # out gets the message alone
    overhead = AEGIS_OVERHEAD
    NONCE_ZEROS = b"\0" * 24

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self._mlen = ffi.new("unsigned long long *")

    def open(self, out: object, frame: memoryview, clen: int) -> int | None:
        src = ffi.from_buffer("unsigned char[]", frame)
        rc = lib.crypto_aead_aegis256_decrypt(
            out, self._mlen, ffi.NULL, src + 1, clen - 1, src, 1, self.next_nonce(), self._key
        )
        if rc != 0:
            return None
        return src[0]
