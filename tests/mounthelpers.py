"""Helpers for the real-mount tests (tests/test_mount_*.py).

Everything here drives the mounted filesystem the way a user would (tools in a
subprocess, plain os calls), or looks at a state directory while it is unmounted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from fluidfs.blocks.record import StoredBlock

MiB = 1 << 20
GiB = 1 << 30

# renameat2(2) flags (linux/fs.h)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.renameat2.restype = ctypes.c_int


def renameat2(old: os.PathLike | str | bytes, new: os.PathLike | str | bytes, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE); raise OSError on failure."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fsdecode(old))


def sh(*cmd: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a tool; on failure show its output in the assertion."""
    kw.setdefault("errors", "replace")
    result = subprocess.run(
        [os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw
    )
    if check:
        assert result.returncode == 0, (
            f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
            f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
        )
    return result


def write_file(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Create/replace *path* with *data*."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def pread(path: Path, offset: int, size: int) -> bytes:
    """Read *size* bytes at *offset* (short at end of file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """sha256 of a file's contents, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def sha256sum(path: Path) -> str:
    """sha256 of a file as the sha256sum tool reports it."""
    return sh("sha256sum", path).stdout.split()[0]


# Extended attributes the filesystem computes itself (e.g. user.fluidfs.redundancy): they
# are listed, but they report the state of the storage, not something the user set.
COMPUTED_XATTRS = ("user.fluidfs.",)


def own_xattrs(path) -> list[str]:
    """The user's own extended attribute names on *path*, sorted."""
    return sorted(n for n in os.listxattr(path) if not n.startswith(COMPUTED_XATTRS))


def snapshot(root: Path, *, inodes: bool = True) -> dict[bytes, tuple]:
    """Everything a user can see of a tree: types, contents, modes, owners, mtimes,
    symlink targets, hard-link identity (inode numbers) and user xattrs.

    With ``inodes=False`` inode numbers and directory sizes are left out, so that
    trees on different filesystems compare equal."""
    found: dict[bytes, tuple] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            xattrs = (
                {}
                if stat.S_ISLNK(st.st_mode)
                else {
                    n: os.getxattr(path, n)
                    for n in os.listxattr(path)
                    if not n.startswith(COMPUTED_XATTRS)
                }
            )
            found[os.path.relpath(path, broot)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if inodes or not stat.S_ISDIR(st.st_mode) else None,
                st.st_nlink if inodes or not stat.S_ISDIR(st.st_mode) else None,
                st.st_ino if inodes else None,
                st.st_mtime_ns,
                content,
                sorted(xattrs.items()),
            )
    return found


def drop_cache(state: Path) -> None:
    """Delete the plaintext cache of an unmounted state dir: reads must rebuild from shards."""
    cache = state / "cache"
    assert cache.is_dir()
    shutil.rmtree(cache)


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def block_records(state: Path, ino: int) -> list[StoredBlock]:
    """The stored-block records of every sealed block of file *ino* (state unmounted)."""
    env = lmdb.open(str(state / "meta.lmdb"), max_dbs=16, readonly=True, lock=False)
    try:
        blockmap = env.open_db(b"blockmap", create=False)
        blocks = env.open_db(b"blocks", create=False)
        found = []
        with env.begin() as txn:
            cursor = txn.cursor(db=blockmap)
            prefix = _u64(ino)
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if key[:8] != prefix:
                        break
                    if value[:1] != b"B":
                        continue
                    block_id = bytes(value[1:])
                    raw = txn.get(block_id, db=blocks)
                    assert raw is not None, "block map names a block without a record"
                    found.append(StoredBlock.decode(block_id, raw))
        return found
    finally:
        env.close()


class ShardTable:
    """The hosted-shard table of an unmounted state dir, opened with the lmdb module."""

    def __init__(self, state: Path) -> None:
        self.env = lmdb.open(str(state / "shards.lmdb"), max_dbs=8, map_size=1 << 40)
        self.db = self.env.open_db(b"shards", create=False)

    def keys_of(self, shard_id: bytes) -> list[bytes]:
        """Table keys (owner || shard id) that hold *shard_id*."""
        with self.env.begin() as txn:
            return [
                bytes(k)
                for k in txn.cursor(db=self.db).iternext(values=False)
                if k[32:] == shard_id
            ]

    def count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.db)["entries"]

    def flip_byte(self, shard_id: bytes, offset: int = 100) -> None:
        """Corrupt one stored shard in place."""
        (key,) = self.keys_of(shard_id)
        with self.env.begin(write=True) as txn:
            value = bytearray(txn.get(key, db=self.db))
            value[offset % len(value)] ^= 0x55
            txn.put(key, bytes(value), db=self.db)

    def delete(self, shard_id: bytes) -> None:
        """Remove one stored shard."""
        (key,) = self.keys_of(shard_id)
        with self.env.begin(write=True) as txn:
            assert txn.delete(key, db=self.db)

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()


def wait_gone(pid: int, timeout: float = 30) -> bool:
    """Wait for process *pid* to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)  # the node is not our child (started detached): no zombie to reap
    return False


@dataclass(frozen=True)
class Spent:
    """CPU time a set of processes used, and how long their threads sat runnable but
    waiting for a CPU (the kernel's run delay), both in seconds."""

    cpu: float
    run_delay: float

    def __sub__(self, other: Spent) -> Spent:
        return Spent(self.cpu - other.cpu, self.run_delay - other.run_delay)


def spent(*pids: int) -> Spent:
    """CPU time (user + system, every thread, exited ones included) and run delay (live
    threads) of the processes *pids* so far: a timing bound on a machine shared with
    other work is taken on these rather than on wall time alone."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = delay = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
        for task in os.listdir(f"/proc/{pid}/task"):
            # (a thread that just ended has no file left)
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                delay += int(f.read().split()[1]) / 1e9
    return Spent(cpu, delay)


def expect_errno(code: int, func, *args, **kw) -> OSError:
    """Call *func* and assert it raises OSError with errno *code*."""
    try:
        func(*args, **kw)
    except OSError as exc:
        assert exc.errno == code, f"expected {errno.errorcode[code]}, got {exc!r}"
        return exc
    raise AssertionError(f"expected {errno.errorcode[code]}, but the call succeeded")


@contextlib.contextmanager
def opened(path, flags: int, mode: int = 0o644):
    """os.open as a context manager."""
    fd = os.open(path, flags, mode)
    try:
        yield fd
    finally:
        os.close(fd)
