"""Copying a file out of a snapshot back into the live tree, through the FUSE operations.

The web page's "restore" (fluidfs/web/) calls this in the node's own trio loop: it
reads the snapshot view (``.snapshots/``) and writes with the same operations the kernel
calls — ``lookup``, ``mkdir``, ``create``, ``write``, ``setattr``, ``release``,
``forget`` — so the copy is an ordinary change of the tree: counted for the next commit,
sealed and uploaded like any write, and never a second writer beside the mount. Every
step is one await of at most ``CHUNK`` bytes, so the loop keeps serving FUSE meanwhile.

A file whose name is taken in the live tree is restored beside it as
``NAME.restored-SNAPSHOT``; missing parent directories are made again with their
snapshot modes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import FUSEError

from fluidfs.fs.layered import LayeredOperations
from fluidfs.fs.operations import is_absent
from fluidfs.fs.snapshots import SNAPDIR_INO, SnapshotView
from fluidfs.fs.tree import ROOT_INO

CHUNK = 128 * 1024


@dataclass(frozen=True)
class Caller:
    """Who asks, in the shape of ``pyfuse3.RequestContext`` (the node's own user)."""

    uid: int
    gid: int
    pid: int = 0
    umask: int = 0o022


@dataclass(frozen=True)
class _MtimeOnly:
    """``pyfuse3.SetattrFields`` that changes only the modification time."""

    update_atime: bool = False
    update_mtime: bool = True
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


class RestoreError(Exception):
    """The file cannot be restored as asked (the message says why)."""


@dataclass
class SnapshotCopy:
    """Restores files from ``.snapshots/<name>/…`` into the live tree."""

    ops: LayeredOperations
    view: SnapshotView
    caller: Caller = Caller(os.getuid(), os.getgid())
    # Tells the kernel a directory entry changed behind its back (invalidate_entry).
    invalidate: Callable[[int, bytes], None] = lambda _parent, _name: None

    async def find(self, snapshot: bytes, parts: list[bytes]) -> int:
        """The view inode of *parts* inside *snapshot* (RestoreError if there is none)."""
        try:
            ino = (await self.view.lookup(SNAPDIR_INO, snapshot)).ino
            for name in parts:
                ino = (await self.view.lookup(ino, name)).ino
        except FUSEError as exc:
            raise RestoreError(f"not in snapshot {snapshot.decode(errors='replace')}: "
                               f"{os.strerror(exc.errno)}") from None
        return ino

    async def restore(self, snapshot: bytes, parts: list[bytes]) -> list[bytes]:
        """Copy the regular file at *parts* of *snapshot* into the live tree; return the
        live path it now has."""
        if not parts:
            raise RestoreError("name a file to restore")
        source = await self.find(snapshot, parts)
        node = self.view.inode(source)
        if not stat.S_ISREG(node.mode):
            raise RestoreError("only regular files can be restored (download folders instead)")
        held: list[int] = []  # inodes we looked up: forgotten at the end, as the kernel would
        try:
            parent = await self._parents(snapshot, parts[:-1], held)
            name = await self._free_name(parent, parts[-1], snapshot, held)
            await self._copy(source, parent, name, node, held)
        except FUSEError as exc:
            raise RestoreError(f"cannot restore: {os.strerror(exc.errno)}") from None
        finally:
            await self.ops.forget([(ino, 1) for ino in held])
        self.invalidate(parent, name)
        return [*parts[:-1], name]

    async def _parents(self, snapshot: bytes, dirs: list[bytes], held: list[int]) -> int:
        parent = ROOT_INO
        for depth, name in enumerate(dirs):
            attrs = await self.ops.lookup(parent, name, self.caller)
            if is_absent(attrs):
                was = self.view.inode(await self.find(snapshot, dirs[: depth + 1]))
                attrs = await self.ops.mkdir(parent, name, stat.S_IMODE(was.mode), self.caller)
                # The kernel may hold a negative entry for the name (operations.absent).
                self.invalidate(parent, name)
            held.append(attrs.st_ino)
            if not stat.S_ISDIR(attrs.st_mode):
                raise RestoreError(f"{os.fsdecode(name)} is not a folder in the live tree")
            parent = attrs.st_ino
        return parent

    async def _free_name(
        self, parent: int, name: bytes, snapshot: bytes, held: list[int]
    ) -> bytes:
        candidate, n = name, 1
        while True:
            attrs = await self.ops.lookup(parent, candidate, self.caller)
            if is_absent(attrs):
                return candidate
            held.append(attrs.st_ino)
            suffix = b".restored-" + snapshot + (b"" if n == 1 else b"-%d" % n)
            candidate, n = name + suffix, n + 1

    async def _copy(self, source: int, parent: int, name: bytes, node, held: list[int]) -> None:
        info, attrs = await self.ops.create(
            parent, name, stat.S_IMODE(node.mode), os.O_WRONLY, self.caller
        )
        held.append(attrs.st_ino)
        try:
            offset = 0
            while offset < node.size:
                chunk = await self.view.read(source, offset, min(CHUNK, node.size - offset))
                if not chunk:
                    break
                await self.ops.write(info.fh, offset, chunk)
                offset += len(chunk)
            when = pyfuse3.EntryAttributes()
            when.st_mtime_ns = node.mtime_ns
            await self.ops.setattr(attrs.st_ino, when, _MtimeOnly(), info.fh, self.caller)
        finally:
            await self.ops.release(info.fh)



def invalidate_entry(parent: int, name: bytes) -> None:
    """``invalidate`` for a mounted session: drop the kernel's entry, if it has one."""
    pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
