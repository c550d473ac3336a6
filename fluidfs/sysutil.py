"""Process-level tuning: allocator thresholds, and releasing mapped file pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (find_library runs a subprocess)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def tune_malloc() -> bool:
    """Keep glibc from giving each multi-MiB buffer fresh pages.

    Blocks (4 MiB) and shards (~512 KiB) are allocated and freed constantly; by
    default glibc serves them with mmap and returns them at once, so every
    buffer is page-faulted anew (measured: RPC throughput nearly halves). Raising
    the thresholds keeps that memory in the heap for reuse. Returns False where
    glibc is not available.
    """
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        return False
    return bool(ok)


MADV_DONTNEED = 4


def release_mapped_pages(path: str) -> int:
    """Unmap the resident pages of every mapping of *path* in this process; return bytes.

    LMDB reads shards through a shared, read-only file mapping, so each shard read
    leaves its pages mapped and counted in the process's RSS although they are
    clean page cache. MADV_DONTNEED on such a mapping only drops the page-table
    entries: the data stays in the page cache and the next access faults it back
    in. Called periodically to keep the mount's RSS about its own memory.
    """
    libc = _libc()
    if libc is None:
        return 0
    released = 0
    try:
        with open("/proc/self/maps") as maps:
            lines = [line for line in maps if line.rstrip("\n").endswith(path)]
    except OSError:
        return 0
    for line in lines:
        start_s, end_s = line.split()[0].split("-")
        start, end = int(start_s, 16), int(end_s, 16)
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
    return released
