"""ISA-L's Cauchy Reed-Solomon parity, computed by calling the library directly.

``erasure.RS_CAUCHY`` is ISA-L's code as liberasurecode's ``isa_l_rs_cauchy`` backend
lays it out: the generator is ``gf_gen_cauchy1_matrix(N, K)`` and the parity rows are
its last ``N - K``, expanded by ``ec_init_tables`` and applied by ``ec_encode_data``.
Going through pyeclib for that costs a copy of the sealed block into ``bytes`` (it takes
nothing else), a copy of every fragment behind liberasurecode's 80-byte headers, and
the GIL for the whole encode. Here the primary pieces are read in place, the parity is
written into one buffer of ours, and ctypes releases the GIL for the call (issue 16).
ctypes, not cffi: cffi's ABI mode parses its declarations with pycparser, ~56 ms of CPU
on first use, more than the parity of 64 MiB costs.

The library is the ``libisal`` pyeclib's wheel bundles (``pyeclib.libs/``), else the
system's. Before the first parity of each (K, N) is handed out it is checked against
pyeclib's on random data; if the library or a symbol is missing, or the check fails,
``parity`` returns None and erasure.py codes through pyeclib as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: pyeclib's parity for (K, N, the K pieces back to back, piece size); erasure.py, which
#: owns pyeclib, passes it. Each (K, N) is checked against it before ISA-L is used.
Reference = Callable[[int, int, bytes, int], list[bytes]]

_SYMBOLS = ("gf_gen_cauchy1_matrix", "ec_init_tables", "ec_encode_data")


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
        for name in _SYMBOLS:
            getattr(lib, name).restype = None
        return lib
    return None


class _Tables:
    """The expanded parity tables of one (K, N), and whether they match pyeclib."""

    def __init__(self, lib: ctypes.CDLL, k: int, n: int) -> None:
        matrix = (ctypes.c_ubyte * (n * k))()
        lib.gf_gen_cauchy1_matrix(matrix, n, k)
        parity_rows = ctypes.byref(matrix, k * k)  # the generator's last N-K rows
        self.tables = (ctypes.c_ubyte * (32 * k * (n - k)))()
        lib.ec_init_tables(k, n - k, parity_rows, self.tables)
        self.checked: bool | None = None  # None until compared with pyeclib


_tables: dict[tuple[int, int], _Tables] = {}
_lock = threading.Lock()


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


def parity(
    k: int, n: int, sealed: bytes | memoryview, piece: int, reference: Reference
) -> list[memoryview] | None:
    """The N-K parity shards of *sealed* (``k x piece`` bytes, sizes checked by the
    caller) as read-only views of one new buffer, or None where ISA-L cannot be used
    (no library, or its output differs from *reference*, pyeclib's, for this K, N)."""
    lib = _library()
    if lib is None or n == k or piece > 2**31 - 1:
        return None
    with _lock:
        tables = _tables.get((k, n))
        if tables is None:
            tables = _tables[(k, n)] = _Tables(lib, k, n)
        if tables.checked is None:
            tables.checked = _matches(lib, tables, k, n, reference)
    if not tables.checked:
        return None
    whole = _compute(lib, tables, k, n, sealed, piece)
    return [whole[j * piece : (j + 1) * piece] for j in range(n - k)]


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
    return True
