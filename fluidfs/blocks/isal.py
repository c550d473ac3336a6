"""ISA-L's Cauchy Reed-Solomon parity, computed by calling the library directly.

``erasure.RS_CAUCHY`` is ISA-L's code as liberasurecode's ``isa_l_rs_cauchy`` backend
lays it out: the generator is ``gf_gen_cauchy1_matrix(N, K)`` and the parity rows are
its last ``N - K``, expanded by ``ec_init_tables`` and applied by ``ec_encode_data``.
Going through pyeclib for that costs a copy of the sealed block into ``bytes`` (it takes
nothing else), a copy of every fragment behind liberasurecode's 80-byte headers, and
the GIL for the whole encode. Here the primary pieces are read in place, the parity is
written into one buffer of ours, and cffi releases the GIL for the call (issue 16).

The library is the ``libisal`` pyeclib's wheel bundles (``pyeclib.libs/``), else the
system's. Before the first parity of each (K, N) is handed out it is checked against
pyeclib's on random data; if the library or a symbol is missing, or the check fails,
``parity`` returns None and erasure.py codes through pyeclib as before.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:
    import cffi
except ImportError:  # pragma: no cover - cffi comes with pynacl, a dependency
    cffi = None

log = logging.getLogger(__name__)

_CDEF = """
void gf_gen_cauchy1_matrix(unsigned char *a, int m, int k);
void ec_init_tables(int k, int rows, unsigned char *a, unsigned char *gftbls);
void ec_encode_data(int len, int k, int rows, unsigned char *gftbls,
                    unsigned char **data, unsigned char **coding);
"""

#: (K, N) -> pyeclib's parity for the given primary pieces; set by erasure.py, which
#: owns pyeclib. Each (K, N) is checked against it before ISA-L is used for it.
Reference = Callable[[int, int, bytes, int], list[bytes]]


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
def _library() -> tuple[object, object] | None:
    """(ffi, lib) for the first libisal that loads with every symbol, or None."""
    return load(_candidates())


def load(paths: Iterable[str]) -> tuple[object, object] | None:
    """(ffi, lib) for the first of *paths* that loads with every symbol ISA-L's code
    needs, or None."""
    if cffi is None:  # pragma: no cover
        return None
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    for path in paths:
        try:
            lib = ffi.dlopen(path)
            for name in ("gf_gen_cauchy1_matrix", "ec_init_tables", "ec_encode_data"):
                getattr(lib, name)
        except (OSError, AttributeError) as exc:
            log.debug("libisal at %s unusable: %s", path, exc)
            continue
        return ffi, lib
    return None


@functools.cache
def _allocator(ffi):
    return ffi.new_allocator(should_clear_after_alloc=False)


class _Tables:
    """The expanded parity tables of one (K, N), and whether they match pyeclib."""

    def __init__(self, ffi, lib, k: int, n: int) -> None:
        matrix = ffi.new("unsigned char[]", n * k)
        lib.gf_gen_cauchy1_matrix(matrix, n, k)
        self.tables = ffi.new("unsigned char[]", 32 * k * (n - k))
        lib.ec_init_tables(k, n - k, matrix + k * k, self.tables)
        self.checked: bool | None = None  # None until compared with pyeclib


_tables: dict[tuple[int, int], _Tables] = {}
_lock = threading.Lock()


def available() -> bool:
    """Does a usable libisal load on this machine?"""
    return _library() is not None


def _compute(ffi, lib, tables: _Tables, k: int, n: int, sealed, piece: int) -> memoryview:
    """The N-K parity pieces of *sealed* (K pieces of *piece* bytes), back to back."""
    rows = n - k
    src = ffi.from_buffer(sealed)
    out = _allocator(ffi)("unsigned char[]", rows * piece)  # ISA-L writes every byte
    data = ffi.new("unsigned char *[]", [src + i * piece for i in range(k)])
    coding = ffi.new("unsigned char *[]", [out + j * piece for j in range(rows)])
    lib.ec_encode_data(piece, k, rows, tables.tables, data, coding)  # GIL released
    return memoryview(ffi.buffer(out)).toreadonly()


def parity(
    k: int, n: int, sealed: bytes | memoryview, piece: int, reference: Reference
) -> list[memoryview] | None:
    """The N-K parity shards of *sealed* (``k x piece`` bytes, sizes checked by the
    caller) as read-only views of one new buffer, or None where ISA-L cannot be used
    (no library, or its output differs from *reference*, pyeclib's, for this K, N)."""
    found = _library()
    if found is None or n == k or piece > 2**31 - 1:
        return None
    ffi, lib = found
    with _lock:
        tables = _tables.get((k, n))
        if tables is None:
            tables = _tables[(k, n)] = _Tables(ffi, lib, k, n)
        if tables.checked is None:
            tables.checked = _matches(ffi, lib, tables, k, n, reference)
    if not tables.checked:
        return None
    whole = _compute(ffi, lib, tables, k, n, sealed, piece)
    return [whole[j * piece : (j + 1) * piece] for j in range(n - k)]


def _matches(ffi, lib, tables: _Tables, k: int, n: int, reference: Reference) -> bool:
    """Does ISA-L called here give pyeclib's parity for random pieces of a few sizes?"""
    for piece in (1, 61, 4099):
        sample = os.urandom(k * piece)
        ours = _compute(ffi, lib, tables, k, n, sample, piece)
        try:
            theirs = b"".join(reference(k, n, sample, piece))
        except Exception as exc:  # pyeclib's own exception classes
            log.warning("pyeclib cannot check ISA-L for %d of %d: %s", k, n, exc)
            return False
        if ours != theirs:
            log.warning("ISA-L's parity differs from pyeclib's for %d of %d; using pyeclib", k, n)
            return False
    return True
