"""Inode records and their on-disk encoding (``meta.lmdb`` table ``inodes``).

Format version 1 (big-endian)::

    u8 version | u32 mode | u32 uid | u32 gid | u32 nlink | u64 size | u64 rdev
    | i64 atime_ns | i64 mtime_ns | i64 ctime_ns | symlink target (rest)
"""

from __future__ import annotations

import stat
import struct
import time
from dataclasses import dataclass

VERSION = 1
_LAYOUT = struct.Struct(">BIIIIQQqqq")


def now_ns() -> int:
    """Current wall-clock time in nanoseconds."""
    return time.time_ns()


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
        return (
            _LAYOUT.pack(
                VERSION,
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.size,
                self.rdev,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
            )
            + self.target
        )

    @classmethod
    def decode(cls, ino: int, raw: bytes) -> Inode:
        """Parse what encode() wrote."""
        version, mode, uid, gid, nlink, size, rdev, at, mt, ct = _LAYOUT.unpack_from(raw)
        if version != VERSION:
            raise ValueError(f"unknown inode record version {version}")
        return cls(ino, mode, uid, gid, nlink, size, rdev, at, mt, ct, bytes(raw[_LAYOUT.size :]))
