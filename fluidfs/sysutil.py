"""Process-level tuning: allocator thresholds, and releasing mapped file pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

GLIBC = "libc.so.6"

_PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_PyBytes_FromStringAndSize.restype = ctypes.py_object


def unfilled_bytes(n: int) -> bytes:
    """A new ``bytes`` of *n* bytes whose contents are not set (CPython's
    ``PyBytes_FromStringAndSize(NULL, n)``).

    For decrypting straight into the object a caller gets back, instead of into a buffer
    and then copying (issue 16: each copy of a shard costs about 0.1 CPU-s per GiB). The
    caller fills it through ``ffi.from_buffer`` before anything else sees it, and drops it
    if that fails; ``bytes(n)`` would clear it first, another pass over the memory.
    """
    if n < 0:
        raise ValueError("negative size")
    return _PyBytes_FromStringAndSize(None, n)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, opened once: glibc by its soname, which every glibc system has;
    only elsewhere looked up with find_library (it runs ldconfig as a subprocess: some
    20 ms of every node's start)."""
    try:
        libc = ctypes.CDLL(GLIBC, use_errno=True)
    except OSError:
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


def trim_malloc() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``).

    ``tune_malloc``'s trim threshold keeps up to 256 MiB of freed heap per arena for
    reuse, which suits a steady stream of shards; a commit's burst of directory
    listings, nodes and shards in worker threads then stays in RssAnon long after it
    is freed. Call after such a burst. Blocking (it walks every arena): use from a
    worker thread. False where glibc is not available."""
    libc = _libc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False


MADV_DONTNEED = 4


class MappedFile:
    """Drops this process's resident pages of a file's mappings (LMDB's shard file).

    LMDB reads shards through a shared, read-only file mapping, so each shard read
    leaves its pages mapped and counted in the process's RSS although they are clean
    page cache. MADV_DONTNEED on such a mapping only drops the page-table entries: the
    data stays in the page cache and the next access faults it back in.

    The mapping's address range is looked up in ``/proc/self/maps`` once and kept: LMDB
    maps its file once, at its full map size. It is looked up again only if madvise
    says the range is no longer mapped. Blocking calls: use from a worker thread.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._ranges: list[tuple[int, int]] | None = None

    def _lookup(self) -> list[tuple[int, int]]:
        try:
            with open("/proc/self/maps") as maps:
                lines = [line for line in maps if line.rstrip("\n").endswith(self.path)]
        except OSError:
            return []
        ranges = []
        for line in lines:
            start_s, end_s = line.split()[0].split("-")
            ranges.append((int(start_s, 16), int(end_s, 16)))
        return ranges

    def release(self) -> int:
        """Unmap the resident pages of every mapping of the file; return the bytes
        covered (0 where glibc is not available or the file is not mapped)."""
        libc = _libc()
        if libc is None:
            return 0
        if self._ranges is None:
            self._ranges = self._lookup()
        released = 0
        for start, end in self._ranges:
            if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
                released += end - start
            else:
                self._ranges = None  # remapped or unmapped: look it up again next time
        return released


def release_mapped_pages(path: str) -> int:
    """``MappedFile(path).release()`` without keeping the range (looks it up each time)."""
    return MappedFile(path).release()


_MEMORY_FIELDS = {"VmRSS": "vm_rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}


def process_memory() -> dict[str, int]:
    """This process's resident memory in bytes, split: ``rss_anon`` (its own heap and
    stacks), ``rss_file`` (mapped file pages, mostly LMDB's: page cache that can be
    dropped) and ``vm_rss`` (their sum, with shared memory); empty where /proc is not."""
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _MEMORY_FIELDS:
            out[_MEMORY_FIELDS[key]] = int(rest.split()[0]) * 1024
    return out
