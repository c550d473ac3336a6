"""The erasure codes a sealed block's K pieces are spread over N shards with.

Both codes are systematic: shard ``i < K`` is the ``i``-th piece of the padded ciphertext
(``K x piece`` bytes, see codec.py), shards ``K..N-1`` are parity. A block's record names
its code (``BlockRecord.code``), and a shard id is the Merkle root of the shard's bytes,
so repair must recreate a lost shard *bit for bit*, with whatever library version runs
years later; the parity of each code is fixed math, pinned by golden tests:

* ``ZFEC`` (code 0, sealed layouts 1-3): zfec's Vandermonde-derived code over GF(2^8).
* ``RS_CAUCHY`` (code 1, sealed layout 4): Reed-Solomon over GF(2^8) with ISA-L's
  Cauchy matrix (``gf_gen_cauchy1_matrix``: parity row ``j`` has ``1 / (j+K xor i)`` at
  column ``i``), computed with ISA-L's SIMD kernels through pyeclib's liberasurecode
  backend ``isa_l_rs_cauchy`` (issue 16: about a seventh of zfec's CPU). liberasurecode
  puts an 80-byte header on each fragment (index, sizes, its own and the backend's
  version, a header checksum): it is never stored or sent, only the payload is, which is
  the piece itself for ``i < K``. To decode, headers are made afresh by the installed
  library: encoding a zero block of the same piece size gives each index's header (with
  checksum type ``none`` no payload byte enters it), cached per (K, N, piece size).

Parity is computed, and lost pieces or shards recovered, by ISA-L called directly
(isal.py: the shards read in place, the result written into one buffer, the GIL
released), checked against pyeclib's output on first use; pyeclib codes only where that
library cannot be used. pyeclib
takes only ``bytes`` (anything else makes liberasurecode abort the process) and holds
the GIL while it codes (~1.3 ms per 4 MiB block); every input's length is checked here
before it is called. If pyeclib or its ISA-L backend cannot be loaded,
``cauchy_available()`` is False: new blocks are sealed with zfec and a ``RS_CAUCHY``
block raises ``ErasureError`` (docs/decisions.md, issue 16).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fluidfs.blocks import isal

if TYPE_CHECKING:
    import zfec

try:
    from pyeclib.ec_iface import ECDriver
except ImportError:  # pragma: no cover - pyeclib is a dependency; see the module doc
    ECDriver = None

ZFEC = 0
RS_CAUCHY = 1
CODES = (ZFEC, RS_CAUCHY)
_BACKEND = "isa_l_rs_cauchy"

# A shard: bytes, or a read-only view of the buffer a block was sealed or coded into.
Shard = bytes | memoryview


class ErasureError(ValueError):
    """Shards could not be coded (wrong sizes, or the code's library is missing)."""


@functools.cache
def cauchy_available() -> bool:
    """Can this machine code ``RS_CAUCHY`` (pyeclib with its ISA-L backend loads)?"""
    if ECDriver is None:
        return False
    try:
        ECDriver(k=2, m=1, ec_type=_BACKEND, chksum_type="none").encode(bytes(2))
    except Exception:  # pyeclib raises its own classes for a backend that will not load
        return False
    return True


# zfec is imported where a ZFEC block is first coded, not with this module: its package
# loads its command-line tools and json for its version, and a node whose blocks are
# all RS_CAUCHY (layout 4 on) never needs it; a fresh mount reads it from a cold disk.


@functools.lru_cache(maxsize=16)
def _zfec_encoder(k: int, n: int) -> zfec.Encoder:
    import zfec

    return zfec.Encoder(k, n)


@functools.lru_cache(maxsize=16)
def _zfec_decoder(k: int, n: int) -> zfec.Decoder:
    import zfec

    return zfec.Decoder(k, n)


@functools.lru_cache(maxsize=16)
def _driver(k: int, n: int):
    if not cauchy_available():
        raise ErasureError("this block's code (ISA-L Reed-Solomon) needs pyeclib with ISA-L")
    try:
        return ECDriver(k=k, m=n - k, ec_type=_BACKEND, chksum_type="none")
    except Exception as exc:  # pyeclib's own exception classes
        raise ErasureError(f"ISA-L cannot code {k} of {n}: {exc}") from None


@functools.lru_cache(maxsize=128)
def _headers(k: int, n: int, piece: int) -> tuple[bytes, ...]:
    """liberasurecode's fragment header for each index, for pieces of *piece* bytes."""
    fragments = _driver(k, n).encode(bytes(k * piece))
    head = len(fragments[0]) - piece
    if head < 0 or any(len(f) != head + piece for f in fragments):  # pragma: no cover
        raise ErasureError("pyeclib laid out fragments unexpectedly")
    return tuple(f[:head] for f in fragments)


def _pyeclib_parity(k: int, n: int, sealed: bytes, piece: int) -> list[bytes]:
    """pyeclib's N-K parity pieces of *sealed* (isal.py checks its own output by them)."""
    head = len(_headers(k, n, piece)[0])
    return [f[head:] for f in _driver(k, n).encode(sealed)[k:]]


def _check(k: int, n: int, piece: int, good: Mapping[int, Shard]) -> tuple[int, ...]:
    """The indexes of *good* (exactly K distinct shards of *piece* bytes), sorted."""
    if not 1 <= k <= n <= 256:
        raise ErasureError(f"no code has {k} of {n} shards")
    numbers = tuple(sorted(good))
    if len(numbers) != k or numbers[0] < 0 or numbers[-1] >= n:
        raise ErasureError(f"need exactly {k} shard numbers below {n}")
    if piece < 1 or any(len(good[i]) != piece for i in numbers):
        raise ErasureError("a shard has the wrong size")
    return numbers


def encode(code: int, k: int, n: int, sealed: bytes | memoryview, piece: int) -> list[Shard]:
    """All N shards of *sealed* (``k x piece`` bytes). The primaries are views of
    *sealed* (but for the Cauchy code through pyeclib: views of its fragments)."""
    if not 1 <= k <= n <= 256:
        raise ErasureError(f"no code has {k} of {n} shards")
    if len(sealed) != k * piece or piece < 1:
        raise ErasureError("sealed bytes are not K pieces")
    view = memoryview(sealed).toreadonly()
    if code == ZFEC:
        pieces = [view[i * piece : (i + 1) * piece] for i in range(k)]
        return [*pieces, *_zfec_encoder(k, n).encode(pieces, tuple(range(k, n)))]
    if code == RS_CAUCHY:
        if n == k:
            return [view[i * piece : (i + 1) * piece] for i in range(k)]
        parity = isal.parity(k, n, view, piece, _pyeclib_parity)
        if parity is not None:
            return [*(view[i * piece : (i + 1) * piece] for i in range(k)), *parity]
        head = len(_headers(k, n, piece)[0])
        fragments = _driver(k, n).encode(bytes(view))  # pyeclib takes bytes only
        return [memoryview(f)[head:].toreadonly() for f in fragments]
    raise ErasureError(f"unknown erasure code {code}")


def join(code: int, k: int, n: int, piece: int, good: Mapping[int, Shard]) -> bytes:
    """The ``k x piece`` coded bytes, from exactly K shards of any numbers."""
    numbers = _check(k, n, piece, good)
    if numbers == tuple(range(k)):  # all primary: decoding is concatenation
        return b"".join(good[i] for i in numbers)
    if code == ZFEC:
        decoded = _zfec_decoder(k, n).decode(tuple(good[i] for i in numbers), numbers)
        return b"".join(decoded)
    if code == RS_CAUCHY:
        direct = isal.join(k, n, piece, {i: good[i] for i in numbers}, _pyeclib_parity)
        if direct is not None:
            return direct
        headers = _headers(k, n, piece)
        try:
            data = _driver(k, n).decode([headers[i] + good[i] for i in numbers])
        except Exception as exc:  # pyeclib's own exception classes
            raise ErasureError(f"decoding failed: {exc}") from None
        if len(data) != k * piece:  # pragma: no cover - the header says k x piece
            raise ErasureError("decoded to the wrong size")
        return data
    raise ErasureError(f"unknown erasure code {code}")


def make(
    code: int, k: int, n: int, piece: int, good: Mapping[int, Shard], wanted: Sequence[int]
) -> dict[int, Shard]:
    """Shards *wanted* (numbers below N) from exactly K shards of any numbers."""
    numbers = _check(k, n, piece, good)
    if any(not 0 <= i < n for i in wanted):
        raise ErasureError(f"shard numbers must be below {n}")
    out: dict[int, Shard] = {i: good[i] for i in wanted if i in good}
    missing = [i for i in wanted if i not in good]
    if not missing:
        return out
    if code == ZFEC:
        if numbers == tuple(range(k)):
            primaries = tuple(good[i] for i in numbers)
        else:
            primaries = tuple(
                _zfec_decoder(k, n).decode(tuple(good[i] for i in numbers), numbers)
            )
        made = _zfec_encoder(k, n).encode(primaries, tuple(missing))
        out.update(zip(missing, made, strict=True))
        return out
    if code == RS_CAUCHY:
        direct = isal.recover(k, n, piece, {i: good[i] for i in numbers}, missing,
                              _pyeclib_parity)
        if direct is not None:
            out.update(zip(missing, direct, strict=True))
            return out
        if len(missing) > 1:  # pyeclib would decode once per shard: decode once, encode
            whole = encode(code, k, n, join(code, k, n, piece, good), piece)
            out.update((i, whole[i]) for i in missing)
            return out
        headers = _headers(k, n, piece)
        head = len(headers[0])
        try:
            made = _driver(k, n).reconstruct([headers[i] + good[i] for i in numbers], missing)
        except Exception as exc:  # pyeclib's own exception classes
            raise ErasureError(f"reconstruction failed: {exc}") from None
        if len(made) != 1 or len(made[0]) != head + piece:  # pragma: no cover
            raise ErasureError("pyeclib reconstructed the wrong shard")
        out[missing[0]] = memoryview(made[0])[head:].toreadonly()
        return out
    raise ErasureError(f"unknown erasure code {code}")
