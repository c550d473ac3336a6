"""The two frame ciphers a secure channel can run, one state per direction.

Both turn ``tag byte || message`` into ``ciphertext || 16-byte MAC`` (17 bytes of
overhead either way, so framing and size limits do not depend on the choice), and both
bind every frame to its position in the stream: a tampered, replayed, reordered or
dropped frame fails to decrypt.

* ``secretstream``: libsodium's ``crypto_secretstream_xchacha20poly1305`` (the tag is
  secretstream's own). Runs everywhere; about 1.5 GB/s on the CPUs we measured.
* ``aes256gcm``: AES-256-GCM with a 96-bit nonce of four zero bytes followed by a 64-bit
  big-endian frame counter (starting at 0 in each direction); the tag byte is encrypted
  in front of the message. Only with hardware AES and carry-less multiply
  (``crypto_aead_aes256gcm_is_available``); about three times faster than secretstream,
  which matters because bulk shard traffic is mostly frame crypto.

Which one a channel uses is settled in the handshake (``fluidfs.net.handshake``): each
HELLO says whether its sender can run AES-256-GCM, and both must say so. The HELLOs are
inside the signed transcript, so the choice cannot be downgraded by a third party.

All functions here may run in a worker thread; a state is used by one thread at a time
(the channel serialises each direction).
"""

from __future__ import annotations

from typing import Protocol, TypeAlias

import nacl.bindings as sodium
from nacl._sodium import ffi, lib  # direct calls: the bindings copy every frame twice

ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES  # 17 = tag byte + MAC
MAC_BYTES = 16

#: a frame's message: one buffer, or several whose bytes follow one another
Message: TypeAlias = bytes | bytearray | memoryview | tuple[bytes | bytearray | memoryview, ...]


def aes_available() -> bool:
    """Can this machine run AES-256-GCM frames (AES-NI and PCLMUL present)?"""
    return bool(lib.crypto_aead_aes256gcm_is_available())


class FrameSealer(Protocol):
    """Encrypts the outgoing frames of one direction."""

    #: the cipher's name as ``SecureChannel.cipher`` reports it
    name: str

    def seal(self, out: object, data: Message, n: int, tag: int) -> None:
        """Write ``n + ABYTES`` bytes of ciphertext for (tag, data) at cffi pointer *out*."""


class FrameOpener(Protocol):
    """Decrypts the incoming frames of one direction."""

    #: where the message starts in *out* after ``open`` (*out* needs this many spare bytes)
    offset: int

    def open(self, out: object, frame: memoryview, clen: int) -> int | None:
        """Decrypt *frame* (``clen`` bytes) into *out*; the message is the
        ``clen - ABYTES`` bytes from ``out + offset``. Return the tag, or None if the
        frame fails authentication."""


class SecretStreamSealer:
    """Outgoing frames with crypto_secretstream_xchacha20poly1305."""

    name = "secretstream"

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

    def __init__(self, state: sodium.crypto_secretstream_xchacha20poly1305_state) -> None:
        self._state = state.statebuf
        self._tag = ffi.new("unsigned char *")

    def open(self, out: object, frame: memoryview, clen: int) -> int | None:
        rc = lib.crypto_secretstream_xchacha20poly1305_pull(
            self._state, out, ffi.NULL, self._tag, ffi.from_buffer(frame), clen, ffi.NULL, 0
        )
        return None if rc != 0 else self._tag[0]


class _Counter:
    """The per-direction frame counter behind the AES-GCM nonce."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._key = key
        self._count = 0

    def next_nonce(self) -> bytes:
        nonce = b"\0\0\0\0" + self._count.to_bytes(8, "big")
        self._count += 1
        return nonce


class AesGcmSealer(_Counter):
    """Outgoing frames with AES-256-GCM and counter nonces."""

    name = "aes256gcm"

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
