"""Seal and open blocks: keyed hash → AEAD encrypt → erasure-code, and back.

Sealed layout. The ciphertext is ``nonce || AEAD(plaintext, aad=block_id)`` (the MAC
at the end); it is zero-padded to ``K x shard_size`` bytes and split into K primary
pieces; zfec makes N shards of ``shard_size`` bytes. The AEAD is named by the nonce's
length, which the block's record keeps (``BlockRecord.nonce``):

* version 2: XChaCha20-Poly1305 (IETF), 24-byte nonce, 16-byte MAC. Written where the
  CPU has no hardware AES.
* version 3: AEGIS-256, 32-byte nonce, 32-byte MAC (libsodium's). Written where the
  CPU has hardware AES (what ``crypto_aead_aes256gcm_is_available`` reports: AES-NI and
  PCLMUL on x86, the crypto extensions on ARMv8), where it costs about a fifth of
  version 2's CPU (issue 16). libsodium also carries a portable AEGIS-256, so every
  machine opens version 3 blocks, only slower without hardware AES.

* version 4: AEGIS-256 as version 3, erasure-coded with ISA-L's Cauchy Reed-Solomon
  (``erasure.RS_CAUCHY``) instead of zfec: about a seventh of zfec's CPU (issue 16).
  The nonce no longer names it alone: the record carries the erasure code
  (``BlockRecord.code``; record.py's record version 3, metaformat's reference code).
  Written where the CPU has hardware AES and pyeclib's ISA-L backend loads.

Versions 2-4 size shards for the block's *size class* (``padded_size``, the Padmé
scheme: at most 12% larger, and only about log log of the size shows), so a peer
holding a shard cannot tell a block's, and so a small file's, exact length. Version 1
(XChaCha20-Poly1305, shards sized for the exact length) still opens the same way (the
record keeps ``size`` and ``shard_size``, and the zero padding is covered by the shard
ids), and resealing keeps a block's own ``shard_size`` and cipher. The per-block random
content key is wrapped as ``nonce(24) || XChaCha20-Poly1305(content_key,
aad=block_id)`` under the user's key-wrapping key in every version. Block id = keyed
BLAKE3 of the plaintext (dedup within one user only); shard id = Merkle root (see
merkle.py).

Everything here is pure CPU work on bytes; callers run it in worker threads. All of
it releases the GIL but pyeclib, which codes layout 4 only where ISA-L cannot be called
directly (isal.py encodes and decodes it). Sealing writes the ciphertext once, into
the buffer the K primary shards are views of, and the code computes only the parity
shards; opening
decrypts straight from the joined pieces (each copy of 4 MiB costs about as much as
hashing it, issue 16). The erasure codes are in erasure.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import blake3
from nacl import bindings as sodium  # importing the bindings runs sodium_init (CPU detection)
from nacl._sodium import ffi, lib  # direct calls: the bindings copy every block twice
from nacl.exceptions import CryptoError

from fluidfs.blocks import erasure, merkle
from fluidfs.blocks.erasure import RS_CAUCHY, ZFEC, ErasureError, Shard, cauchy_available
from fluidfs.sysutil import unfilled_bytes

NONCE_SIZE = 24  # the key-wrapping nonce, and a version-2 block's
TAG_SIZE = 16
KEY_SIZE = 32
WRAPPED_KEY_SIZE = NONCE_SIZE + KEY_SIZE + TAG_SIZE
OVERHEAD = NONCE_SIZE + TAG_SIZE  # version 2's

XCHACHA = 2  # sealed layout version 2: XChaCha20-Poly1305, zfec
AEGIS = 3  # sealed layout version 3: AEGIS-256, zfec
CAUCHY = 4  # sealed layout version 4: AEGIS-256, ISA-L Cauchy Reed-Solomon


@dataclass(frozen=True)
class _Aead:
    """One sealed layout version's AEAD (libsodium's combined-mode functions)."""

    nonce_size: int
    mac_size: int
    encrypt: object
    decrypt: object

    @property
    def overhead(self) -> int:
        return self.nonce_size + self.mac_size


_AEADS = {
    XCHACHA: _Aead(
        NONCE_SIZE,
        TAG_SIZE,
        lib.crypto_aead_xchacha20poly1305_ietf_encrypt,
        lib.crypto_aead_xchacha20poly1305_ietf_decrypt,
    ),
    AEGIS: _Aead(
        lib.crypto_aead_aegis256_npubbytes(),
        lib.crypto_aead_aegis256_abytes(),  # libsodium's AEGIS MAC is 32 bytes
        lib.crypto_aead_aegis256_encrypt,
        lib.crypto_aead_aegis256_decrypt,
    ),
}
_AEADS[CAUCHY] = _AEADS[AEGIS]
#: sealed layout version -> its erasure code
_CODES = {XCHACHA: ZFEC, AEGIS: ZFEC, CAUCHY: RS_CAUCHY}
_BY_NONCE = {_AEADS[v].nonce_size: v for v in (XCHACHA, AEGIS)}  # the zfec layouts
#: the nonce lengths a block record may carry
NONCE_SIZES = frozenset(_BY_NONCE)

_encrypt = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt
_alloc = ffi.new_allocator(should_clear_after_alloc=False)
_decrypt = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt


def hardware_aes() -> bool:
    """Does this CPU have the AES instructions AEGIS-256 runs fast on?

    libsodium's ``crypto_aead_aes256gcm_is_available`` checks CPUID for AES-NI and
    PCLMUL (x86) or the ARMv8 crypto extensions: the same units libsodium's AEGIS-256
    picks its hardware implementation by (x86 also wants AVX, which every CPU with
    AES-NI and PCLMUL but a few low-power Atoms has).
    """
    return bool(lib.crypto_aead_aes256gcm_is_available())


def default_version() -> int:
    """The sealed layout version new blocks get on this machine (see module doc)."""
    if not hardware_aes():
        return XCHACHA
    return CAUCHY if cauchy_available() else AEGIS


def code_of(version: int) -> int:
    """The erasure code (erasure.py) of sealed layout *version*."""
    return _CODES[version]


def nonce_size(version: int) -> int:
    """Bytes of the nonce a block of sealed layout *version* carries in its record."""
    return _AEADS[version].nonce_size


def overhead(version: int) -> int:
    """Bytes the sealed layout *version* adds to a block's plaintext (nonce + MAC)."""
    return _AEADS[version].overhead


def _seal_into(
    out: bytearray | memoryview, plaintext: bytes, aad: bytes, nonce: bytes, key: bytes, aead: _Aead
) -> None:
    """Write ``nonce || AEAD(plaintext, aad)`` at the start of *out*."""
    out[: aead.nonce_size] = nonce
    dst = ffi.from_buffer(out, require_writable=True) + aead.nonce_size
    rc = aead.encrypt(
        dst, ffi.NULL, ffi.from_buffer(plaintext), len(plaintext), aad, len(aad),
        ffi.NULL, nonce, key,
    )
    if rc != 0:  # pragma: no cover - libsodium never fails here
        raise RuntimeError("block encryption failed")


def _open_from(sealed: bytes, length: int, aad: bytes, key: bytes, aead: _Aead) -> bytes | None:
    """The plaintext of the first *length* bytes of *sealed* (``nonce || ciphertext``,
    *length* counting both), or None if it fails authentication."""
    n = length - aead.overhead
    src = ffi.from_buffer(sealed)
    # decrypted straight into the bytes returned: a buffer and its copy into bytes cost
    # a pass over every restored block
    plaintext = unfilled_bytes(n)
    rc = aead.decrypt(
        ffi.from_buffer("unsigned char[]", plaintext), ffi.NULL, ffi.NULL,
        src + aead.nonce_size, length - aead.nonce_size, aad, len(aad), src, key,
    )
    return None if rc != 0 else plaintext


class BlockError(Exception):
    """A block could not be rebuilt."""


class NotEnoughShards(BlockError):
    """Fewer than K good shards were available."""


class CorruptBlock(BlockError):
    """Decoded data failed authentication or did not match the block id."""


@dataclass(frozen=True)
class BlockRecord:
    """What the owner keeps about one sealed block (enough to rebuild and audit it)."""

    block_id: bytes
    size: int
    shard_size: int
    needed: int
    wrapped_key: bytes
    nonce: bytes
    shard_ids: tuple[bytes, ...]
    code: int = ZFEC  # the erasure code (erasure.py); RS_CAUCHY only in layout 4

    @property
    def total(self) -> int:
        """N, the number of shards."""
        return len(self.shard_ids)


def padded_size(size: int) -> int:
    """The size class of *size* bytes (Padmé, Nikitin et al., PETS 2019).

    Keeps the top ~log2(log2(size)) bits of the size and rounds the rest up: at most
    about 12% more, and powers of two (whole blocks) stay as they are.
    """
    if size < 2:
        return size
    exponent = size.bit_length() - 1
    low_bits = exponent - exponent.bit_length()
    mask = (1 << low_bits) - 1
    return (size + mask) & ~mask


def shard_size_for(size: int, needed: int, version: int) -> int:
    """Bytes per shard for a block of *size* plaintext bytes split into *needed* pieces
    and sealed in layout *version* (sized for its class, see ``padded_size``)."""
    return -(-(padded_size(size) + overhead(version)) // needed)


def sealed_version(record: BlockRecord) -> int:
    """The sealed layout version of *record*'s block (named by its erasure code and its
    nonce's length)."""
    version = _BY_NONCE.get(len(record.nonce))
    if record.code == RS_CAUCHY and version == AEGIS:
        return CAUCHY
    if version is None or record.code != ZFEC:
        raise CorruptBlock(f"block {record.block_id.hex()[:16]}: unknown sealed layout")
    return version


class BlockCodec:
    """Seals and opens blocks for one user with fixed K-of-N erasure coding."""

    def __init__(
        self,
        *,
        dedup_key: bytes,
        wrap_key: bytes,
        needed: int,
        total: int,
        version: int | None = None,
    ) -> None:
        """*version*: the sealed layout new blocks get (default: ``default_version()``);
        blocks of every version open."""
        if version is None:
            version = default_version()
        if version not in _AEADS:
            raise ValueError(f"unknown sealed layout version {version}")
        self.version = version
        self.dedup_key = dedup_key
        self.wrap_key = wrap_key
        self.needed = needed
        self.total = total

    def block_id(self, plaintext: bytes | memoryview) -> bytes:
        """Keyed hash of the plaintext: the block's id and dedup key."""
        return blake3.blake3(plaintext, key=self.dedup_key, max_threads=1).digest()

    def seal(
        self, plaintext: bytes, block_id: bytes | None = None
    ) -> tuple[BlockRecord, list[Shard]]:
        """Encrypt and erasure-code *plaintext*; return its record and its N shards (the
        K primary ones are read-only views of one buffer)."""
        if block_id is None:
            block_id = self.block_id(plaintext)
        content_key = os.urandom(KEY_SIZE)
        nonce = os.urandom(_AEADS[self.version].nonce_size)
        piece = shard_size_for(len(plaintext), self.needed, self.version)
        shards = self._encode(
            plaintext, block_id, content_key, nonce, piece, self.needed, self.total,
            self.version,
        )
        wrap_nonce = os.urandom(NONCE_SIZE)
        wrapped = wrap_nonce + _encrypt(content_key, block_id, wrap_nonce, self.wrap_key)
        record = BlockRecord(
            block_id=block_id,
            size=len(plaintext),
            shard_size=len(shards[0]),
            needed=self.needed,
            wrapped_key=wrapped,
            nonce=nonce,
            shard_ids=tuple(merkle.shard_id(s) for s in shards),
            code=_CODES[self.version],
        )
        return record, shards

    def reseal(self, record: BlockRecord, plaintext: bytes) -> list[Shard]:
        """Recreate the exact shards of *record* from its plaintext (for upload or repair)."""
        if self.block_id(plaintext) != record.block_id:
            raise CorruptBlock(f"block {record.block_id.hex()[:16]}: plaintext does not match")
        return self._encode(
            plaintext,
            record.block_id,
            self._content_key(record),
            record.nonce,
            record.shard_size,
            record.needed,
            record.total,
            sealed_version(record),
        )

    def _encode(
        self,
        plaintext: bytes,
        block_id: bytes,
        content_key: bytes,
        nonce: bytes,
        piece: int,
        needed: int,
        total: int,
        version: int,
    ) -> list[Shard]:
        aead = _AEADS[version]
        length = piece * needed
        end = len(plaintext) + aead.overhead
        if length < end:
            raise CorruptBlock(f"block {block_id.hex()[:16]}: shard size too small for it")
        # Not zeroed on allocation (a zeroed 4 MiB costs a pass over it): the ciphertext
        # overwrites all but the padding after it, which is zeroed here.
        buf = _alloc("unsigned char[]", length)
        sealed = ffi.buffer(buf)
        sealed[end:] = bytes(length - end)
        _seal_into(sealed, plaintext, block_id, nonce, content_key, aead)
        try:
            return erasure.encode(_CODES[version], needed, total, sealed, piece)
        except ErasureError as exc:
            raise CorruptBlock(f"block {block_id.hex()[:16]}: {exc}") from None

    def _content_key(self, record: BlockRecord) -> bytes:
        try:
            return _decrypt(
                record.wrapped_key[NONCE_SIZE:],
                record.block_id,
                record.wrapped_key[:NONCE_SIZE],
                self.wrap_key,
            )
        except CryptoError:
            raise CorruptBlock(f"block {record.block_id.hex()[:16]}: key does not unwrap") from None

    def recreate(
        self, record: BlockRecord, good: dict[int, bytes], wanted: list[int]
    ) -> dict[int, bytes]:
        """Recreate shards *wanted* from K shards, without decrypting anything.

        The ciphertext pieces are recovered by erasure decoding and only the wanted
        shards are encoded again; each result is checked against its shard id, so the
        inputs need not have been verified: a bad one raises CorruptBlock here.
        """
        numbers = sorted(good)[: record.needed]
        if len(numbers) < record.needed:
            raise NotEnoughShards(f"{len(numbers)} good shards of {record.needed} needed")
        try:
            made = erasure.make(
                code_of(sealed_version(record)), record.needed, record.total,
                record.shard_size, {i: good[i] for i in numbers}, wanted,
            )
        except ErasureError as exc:
            raise CorruptBlock(f"block {record.block_id.hex()[:16]}: {exc}") from None
        out = {index: bytes(made[index]) for index in wanted}
        for index, shard in out.items():
            if not self.check_shard(record, index, shard):
                raise CorruptBlock(
                    f"block {record.block_id.hex()[:16]}: shard {index} came out wrong"
                )
        return out

    def check_shard(self, record: BlockRecord, index: int, data: bytes) -> bool:
        """Is *data* exactly shard *index* of *record*?"""
        return len(data) == record.shard_size and merkle.shard_id(data) == record.shard_ids[index]

    def open(
        self, record: BlockRecord, shards: dict[int, bytes], *, verified: bool = False,
        check_id: bool = True,
    ) -> bytes:
        """Rebuild the plaintext from at least K shards (index → bytes).

        Shards are checked against their ids unless *verified*; bad ones are
        skipped. With *check_id* False the plaintext is not hashed against the block
        id: the AEAD, under the block's own content key with the id as associated data,
        already proves it is the block the record names (docs/decisions.md, "The block
        id is not hashed again on reading"); ``check --read-data`` still hashes it.
        Raises NotEnoughShards or CorruptBlock.
        """
        version = sealed_version(record)
        good: dict[int, bytes] = {}
        for index, data in sorted(shards.items()):
            if len(good) == record.needed:
                break
            if verified or self.check_shard(record, index, data):
                good[index] = data
        if len(good) < record.needed:
            raise NotEnoughShards(f"{len(good)} good shards of {record.needed} needed")
        try:
            sealed = erasure.join(
                _CODES[version], record.needed, record.total, record.shard_size, good
            )
        except ErasureError as exc:
            raise CorruptBlock(f"block {record.block_id.hex()[:16]}: {exc}") from None
        aead = _AEADS[version]
        content_key = self._content_key(record)
        plaintext = None
        if len(sealed) >= record.size + aead.overhead:
            plaintext = _open_from(
                sealed, record.size + aead.overhead, record.block_id, content_key, aead
            )
        if plaintext is None:
            raise CorruptBlock(f"block {record.block_id.hex()[:16]} failed authentication")
        # The zero padding after the ciphertext is not authenticated by the AEAD; a
        # shard changed only there would open. An erasure code maps any change of its
        # input shards to a change of the joined bytes, so checking the padding makes
        # "the block opens" prove every shard used honest (readers skip hashing them).
        end = record.size + aead.overhead
        if sealed.count(0, end) != len(sealed) - end:
            raise CorruptBlock(f"block {record.block_id.hex()[:16]}: padding is not zero")
        if check_id and self.block_id(plaintext) != record.block_id:
            raise CorruptBlock(f"block {record.block_id.hex()[:16]} does not match its id")
        return plaintext
