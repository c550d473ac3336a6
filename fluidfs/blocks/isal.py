"""ISA-L's Cauchy Reed-Solomon, parity and decoding, computed by calling the library directly.

``erasure.RS_CAUCHY`` is ISA-L's code as liberasurecode's ``isa_l_rs_cauchy`` backend
lays it out: the generator is ``gf_gen_cauchy1_matrix(N, K)`` and the parity rows are
its last ``N - K``, expanded by ``ec_init_tables`` and applied by ``ec_encode_data``.
Going through pyeclib for that costs a copy of the sealed block into ``bytes`` (it takes
nothing else), a copy of every fragment behind liberasurecode's 80-byte headers, and
the GIL for the whole encode. Here the primary pieces are read in place, the parity is
written into one buffer of ours, and ctypes releases the GIL for the call (issue 16).
ctypes, not cffi: cffi's ABI mode parses its declarations with pycparser, ~56 ms of CPU
on first use, more than the parity of 64 MiB costs.

Decoding (``join``: the K pieces from any K shards; ``recover``: any shards from any
K) inverts the generator's rows of the shards at hand (``gf_invert_matrix``) and applies
the rows wanted the same way, writing only what is missing; pyeclib copied every shard
behind a header and held the GIL, ~15 ms of CPU per 4 MiB block with a parity shard
among the K against ~0.3 ms here.

The library is the ``libisal`` pyeclib's wheel bundles (``pyeclib.libs/``), else the
system's. Before the first use of each (K, N) its parity is checked against pyeclib's
on random data, and a decoding from the last K shards against the data; if the library
or a symbol is missing, or the check fails, ``parity``, ``join`` and ``recover`` return
None and erasure.py codes through pyeclib as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: pyeclib's parity for (K, N, the K pieces back to back, piece size); erasure.py, which
#: owns pyeclib, passes it. Each (K, N) is checked against it before ISA-L is used.
Reference = Callable[[int, int, bytes, int], list[bytes]]
Buffer = bytes | memoryview

_SYMBOLS = (
    "gf_gen_cauchy1_matrix", "ec_init_tables", "ec_encode_data", "gf_invert_matrix", "gf_mul",
)


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``: the address of any buffer, read-only ones included
    (``ctypes.c_char.from_buffer`` takes only writable ones)."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),  # not py_object: PyBuffer_Release owns the reference
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None
_PyBUF_SIMPLE = 0  # C-contiguous bytes, read-only allowed
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object


def _candidates() -> Iterator[str]:
    """Paths of libisal to try: pyeclib's bundled copy first, then the system's (asked
    for only if needed: ``find_library`` runs ldconfig, even gcc, as subprocesses)."""
    spec = importlib.util.find_spec("pyeclib")
    if spec is not None and spec.origin is not None:
        libs = Path(spec.origin).parent.parent / "pyeclib.libs"
        if libs.is_dir():
            yield from sorted(str(p) for p in libs.glob("libisal*.so*"))
    system = ctypes.util.find_library("isal")
    if system:
        yield system


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The first libisal that loads with every symbol, or None."""
    return load(_candidates())


def load(paths: Iterable[str]) -> ctypes.CDLL | None:
    """The first of *paths* that loads with every symbol ISA-L's code needs (typed for
    ctypes), or None."""
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            for name in _SYMBOLS:
                getattr(lib, name)
        except (OSError, AttributeError) as exc:
            log.debug("libisal at %s unusable: %s", path, exc)
            continue
        ptr, ptrs, i = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int
        lib.gf_gen_cauchy1_matrix.argtypes = (ptr, i, i)
        lib.ec_init_tables.argtypes = (i, i, ptr, ptr)
        lib.ec_encode_data.argtypes = (i, i, i, ptr, ptrs, ptrs)
        lib.gf_invert_matrix.argtypes = (ptr, ptr, i)
        lib.gf_mul.argtypes = (ctypes.c_ubyte, ctypes.c_ubyte)
        for name in _SYMBOLS:
            getattr(lib, name).restype = None
        lib.gf_invert_matrix.restype = i
        lib.gf_mul.restype = ctypes.c_ubyte
        return lib
    return None


class _Tables:
    """The expanded parity tables of one (K, N), and whether they match pyeclib."""

    def __init__(self, lib: ctypes.CDLL, k: int, n: int) -> None:
        self.matrix = (ctypes.c_ubyte * (n * k))()  # row i: shard i from the K pieces
        lib.gf_gen_cauchy1_matrix(self.matrix, n, k)
        parity_rows = ctypes.byref(self.matrix, k * k)  # the generator's last N-K rows
        self.tables = (ctypes.c_ubyte * (32 * k * (n - k)))()
        lib.ec_init_tables(k, n - k, parity_rows, self.tables)
        self.checked: bool | None = None  # None until compared with pyeclib
        # Expanded tables that make shards *targets* from shards *sources*, by
        # (sources, targets); bounded: a block's K sources are mostly the same few sets.
        self.recovery: dict[tuple[tuple[int, ...], tuple[int, ...]], ctypes.Array] = {}


_tables: dict[tuple[int, int], _Tables] = {}
_lock = threading.RLock()  # the check on first use builds recovery tables too


def available() -> bool:
    """Does a usable libisal load on this machine?"""
    return _library() is not None


def _compute(lib: ctypes.CDLL, tables: _Tables, k: int, n: int, sealed, piece: int):
    """The N-K parity pieces of *sealed* (K pieces of *piece* bytes), back to back, as
    a (read-only) memoryview of bytes."""
    rows = n - k
    # A new bytes object not yet filled in (the C API's way to build one: nothing else
    # holds it until it is returned); a zeroed bytearray would cost a pass over it.
    out = _new_bytes(None, rows * piece)
    source, target = _PyBuffer(), _PyBuffer()
    if _get_buffer(sealed, ctypes.byref(source), _PyBUF_SIMPLE) != 0:  # pragma: no cover
        raise ValueError("not a contiguous buffer")
    try:
        _get_buffer(out, ctypes.byref(target), _PyBUF_SIMPLE)
        try:
            data = (ctypes.c_void_p * k)(*(source.buf + i * piece for i in range(k)))
            coding = (ctypes.c_void_p * rows)(*(target.buf + j * piece for j in range(rows)))
            lib.ec_encode_data(piece, k, rows, tables.tables, data, coding)  # GIL released
        finally:
            _release_buffer(ctypes.byref(target))
    finally:
        _release_buffer(ctypes.byref(source))
    return memoryview(out)


def _checked(lib: ctypes.CDLL, k: int, n: int, reference: Reference) -> _Tables | None:
    """The tables of (K, N) once checked against *reference*, or None if they differ."""
    with _lock:
        tables = _tables.get((k, n))
        if tables is None:
            tables = _tables[(k, n)] = _Tables(lib, k, n)
        if tables.checked is None:
            tables.checked = _matches(lib, tables, k, n, reference)
    return tables if tables.checked else None


def parity(
    k: int, n: int, sealed: bytes | memoryview, piece: int, reference: Reference
) -> list[memoryview] | None:
    """The N-K parity shards of *sealed* (``k x piece`` bytes, sizes checked by the
    caller) as read-only views of one new buffer, or None where ISA-L cannot be used
    (no library, or its output differs from *reference*, pyeclib's, for this K, N)."""
    lib = _library()
    if lib is None or n == k or piece > 2**31 - 1:
        return None
    tables = _checked(lib, k, n, reference)
    if tables is None:
        return None
    whole = _compute(lib, tables, k, n, sealed, piece)
    return [whole[j * piece : (j + 1) * piece] for j in range(n - k)]


_RECOVERY_TABLES = 512  # per (K, N): C(12, 4) = 495 source sets, one target set each


def _recovery(
    lib: ctypes.CDLL, tables: _Tables, k: int, sources: tuple[int, ...], targets: tuple[int, ...]
) -> ctypes.Array:
    """Expanded tables that compute shards *targets* from shards *sources* (K distinct).

    The generator's rows of the sources form a K x K matrix; its inverse turns those
    shards back into the K pieces, and generator row ``t`` times that inverse turns them
    into shard ``t`` (for a piece, ``t < K``, the inverse's own row ``t``)."""
    key = (sources, targets)
    with _lock:
        found = tables.recovery.get(key)
    if found is not None:
        return found
    gen = tables.matrix
    square = (ctypes.c_ubyte * (k * k))()
    for r, s in enumerate(sources):
        ctypes.memmove(ctypes.byref(square, r * k), ctypes.byref(gen, s * k), k)
    inverse = (ctypes.c_ubyte * (k * k))()
    if lib.gf_invert_matrix(square, inverse, k) != 0:  # pragma: no cover - Cauchy is MDS
        raise ValueError(f"shards {sources} do not determine the block")
    rows = (ctypes.c_ubyte * (len(targets) * k))()
    for r, t in enumerate(targets):
        if t < k:  # a piece: the inverse's own row
            ctypes.memmove(ctypes.byref(rows, r * k), ctypes.byref(inverse, t * k), k)
            continue
        for c in range(k):
            value = 0
            for j in range(k):  # (generator row t) . (inverse column c), over GF(2^8)
                value ^= lib.gf_mul(gen[t * k + j], inverse[j * k + c])
            rows[r * k + c] = value
    expanded = (ctypes.c_ubyte * (32 * k * len(targets)))()
    lib.ec_init_tables(k, len(targets), rows, expanded)
    with _lock:
        if len(tables.recovery) >= _RECOVERY_TABLES:
            tables.recovery.pop(next(iter(tables.recovery)))
        tables.recovery[key] = expanded
    return expanded


def _recover_into(
    lib: ctypes.CDLL,
    tables: _Tables,
    k: int,
    piece: int,
    good: Mapping[int, Buffer],
    targets: tuple[int, ...],
    out: Buffer,
    slots: Sequence[int],
) -> None:
    """Shards *targets* from the K shards *good*, written at offsets *slots* of *out*
    (a writable buffer; the caller checked every size)."""
    sources = tuple(sorted(good))
    expanded = _recovery(lib, tables, k, sources, targets)
    held: list[_PyBuffer] = []
    try:
        for i in sources:
            view = _PyBuffer()
            if _get_buffer(good[i], ctypes.byref(view), _PyBUF_SIMPLE) != 0:  # pragma: no cover
                raise ValueError("not a contiguous buffer")
            held.append(view)
        target = _PyBuffer()
        if _get_buffer(out, ctypes.byref(target), _PyBUF_SIMPLE) != 0:  # pragma: no cover
            raise ValueError("not a contiguous buffer")
        held.append(target)
        data = (ctypes.c_void_p * k)(*(v.buf for v in held[:k]))
        coding = (ctypes.c_void_p * len(targets))(*(target.buf + s for s in slots))
        lib.ec_encode_data(piece, k, len(targets), expanded, data, coding)  # GIL released
    finally:
        for view in held:
            _release_buffer(ctypes.byref(view))


def join(
    k: int, n: int, piece: int, good: Mapping[int, Buffer], reference: Reference
) -> bytes | None:
    """The ``k x piece`` bytes the K shards *good* (index -> shard, sizes checked by the
    caller) were coded from, or None where ISA-L cannot be used. The pieces among *good*
    are copied into place and only the missing ones are computed, straight into the
    result (pyeclib took each shard behind a header: a copy of every shard, and then
    decoded holding the GIL)."""
    lib = _library()
    if lib is None or n == k or k * piece > 2**31 - 1:
        return None
    tables = _checked(lib, k, n, reference)
    if tables is None:
        return None
    missing = tuple(i for i in range(k) if i not in good)
    out = _new_bytes(None, k * piece)  # filled in below before anything else sees it
    target = _PyBuffer()
    _get_buffer(out, ctypes.byref(target), _PyBUF_SIMPLE)
    try:
        for i, shard in good.items():
            if i < k:
                source = _PyBuffer()
                if _get_buffer(shard, ctypes.byref(source), _PyBUF_SIMPLE) != 0:  # pragma: no cover
                    raise ValueError("not a contiguous buffer")
                try:
                    ctypes.memmove(target.buf + i * piece, source.buf, piece)
                finally:
                    _release_buffer(ctypes.byref(source))
        if missing:
            _recover_into(lib, tables, k, piece, good, missing, out, [i * piece for i in missing])
    finally:
        _release_buffer(ctypes.byref(target))
    return out


def recover(
    k: int, n: int, piece: int, good: Mapping[int, Buffer], wanted: Sequence[int],
    reference: Reference,
) -> list[memoryview] | None:
    """Shards *wanted* (none of them in *good*) from the K shards *good*, as read-only
    views of one new buffer, or None where ISA-L cannot be used."""
    lib = _library()
    if lib is None or n == k or len(wanted) * piece > 2**31 - 1:
        return None
    tables = _checked(lib, k, n, reference)
    if tables is None:
        return None
    out = _new_bytes(None, len(wanted) * piece)
    slots = [r * piece for r in range(len(wanted))]
    _recover_into(lib, tables, k, piece, good, tuple(wanted), out, slots)
    whole = memoryview(out)
    return [whole[s : s + piece] for s in slots]


def _matches(lib: ctypes.CDLL, tables: _Tables, k: int, n: int, reference: Reference) -> bool:
    """Does ISA-L called here give pyeclib's parity for random pieces of a few sizes?"""
    for piece in (1, 61, 4099):
        sample = os.urandom(k * piece)
        ours = _compute(lib, tables, k, n, sample, piece)
        try:
            theirs = b"".join(reference(k, n, sample, piece))
        except Exception as exc:  # pyeclib's own exception classes
            log.warning("pyeclib cannot check ISA-L for %d of %d: %s", k, n, exc)
            return False
        if ours != theirs:
            log.warning("ISA-L's parity differs from pyeclib's for %d of %d; using pyeclib", k, n)
            return False
        # Decoding from the last K shards (parity wherever N > K) must give the pieces.
        shards = [memoryview(sample)[i * piece : (i + 1) * piece] for i in range(k)]
        shards += [ours[j * piece : (j + 1) * piece] for j in range(n - k)]
        sources = {i: shards[i] for i in range(n - k, n)}
        pieces = bytearray(k * piece)
        _recover_into(lib, tables, k, piece, sources, tuple(range(k)), pieces,
                      [i * piece for i in range(k)])
        if pieces != sample:
            log.warning("ISA-L decodes %d of %d wrongly; using pyeclib", k, n)
            return False
    return True
