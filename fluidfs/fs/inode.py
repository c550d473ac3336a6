"""Inode records and their on-disk encoding (``meta.lmdb`` table ``inodes``).

``Inode`` is the one definition of an inode's fields: the record below, metadata
entries (fs/metaformat.py) and everything else that copies them derive the list from
``FIELDS`` instead of spelling it out.

Format version 1 (big-endian)::

    u8 version | u32 mode | u32 uid | u32 gid | u32 nlink | u64 size | u64 rdev
    | i64 atime_ns | i64 mtime_ns | i64 ctime_ns | symlink target (rest)

that is the fields between ``ino`` (the key) and ``target`` (the rest), in order.
"""

from __future__ import annotations

import stat
import struct
import sys
import time
from dataclasses import dataclass, fields

VERSION = 1
_FIXED = "IIIIQQqqq"  # the fixed-size fields' types, in FIELDS order
_LAYOUT = struct.Struct(">B" + _FIXED)


def now_ns() -> int:
    """Current wall-clock time in nanoseconds."""
    return time.time_ns()


# Linux's CLOCK_REALTIME_COARSE (Python 3.11 does not name it): the clock the kernel
# stamps a FUSE file's times from, read without a system call (vDSO).
_COARSE = 5 if sys.platform.startswith("linux") else None


def tick_ns() -> int:
    """The wall clock as the kernel's file timestamps read it: the last timer tick
    (1-4 ms granularity), in nanoseconds. A new file stamped with it has, for the rest
    of the tick, the times the kernel would give it, so a write in that tick changes
    none of them (see ``FluidOperations._new_inode``)."""
    return time.clock_gettime_ns(_COARSE) if _COARSE is not None else time.time_ns()


@dataclass(slots=True)
class Inode:
    """One file, directory, symlink or special file."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    size: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    target: bytes = b""

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """True for a regular file."""
        return stat.S_ISREG(self.mode)

    def touch(self, *, atime: bool = False, mtime: bool = False, ctime: bool = False) -> None:
        """Set the named times to now."""
        t = now_ns()
        if atime:
            self.atime_ns = t
        if mtime:
            self.mtime_ns = t
        if ctime:
            self.ctime_ns = t

    def encode(self) -> bytes:
        """Serialise (version 1)."""
        return _encode(self)

    def copy(self) -> Inode:
        """A copy to change (``dataclasses.replace`` costs 5x more on every request)."""
        return _copy(self)

    @classmethod
    def decode(cls, ino: int, raw: bytes) -> Inode:
        """Parse what encode() wrote."""
        fixed = _LAYOUT.unpack_from(raw)
        if fixed[0] != VERSION:
            raise ValueError(f"unknown inode record version {fixed[0]}")
        return cls(ino, *fixed[1:], bytes(raw[_LAYOUT.size :]))


#: The inode's fields, in order: ``ino``, the fixed-size attributes, ``target``.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Inode))
if FIELDS[0] != "ino" or FIELDS[-1] != "target" or len(FIELDS) - 2 != len(_FIXED):
    raise AssertionError("the inode record layout no longer matches Inode's fields")
if FIELDS[1] != "mode":
    raise AssertionError("record_is_reg reads the mode right after the version byte")

_MODE = struct.Struct(">I")  # the mode, the first field after the version byte


def record_is_reg(raw: bytes) -> bool:
    """True if the encoded inode *raw* is a regular file's, read without decoding the
    record (a tenth of ``Inode.decode``'s cost: status counts every inode)."""
    if raw[0] != VERSION:
        return Inode.decode(0, raw).is_reg  # says what is wrong with it
    return stat.S_ISREG(_MODE.unpack_from(raw, 1)[0])

# encode() runs on every inode write: generated from FIELDS (as dataclasses generates
# __init__) it costs what the hand-written field list did.
_encode = eval(  # the source is built from our own field names
    "lambda inode, pack=_LAYOUT.pack: pack(VERSION, "
    + ", ".join(f"inode.{name}" for name in FIELDS[1:-1])
    + ") + inode.target",
    {"_LAYOUT": _LAYOUT, "VERSION": VERSION},
)
_copy = eval(  # the source is built from our own field names
    "lambda inode, cls=Inode: cls(" + ", ".join(f"inode.{name}" for name in FIELDS) + ")",
    {"Inode": Inode},
)
