"""Reading snapshots for the page: resolve a path, list a folder, stream a file or a tar.

Everything reads the snapshot view (fs/snapshots.py ``SnapshotView``) on the node's
loop, ``CHUNK`` bytes per await, so a download of any size streams without holding
more than one chunk and never stalls the mount. A folder downloads as a POSIX tar
(pax headers for long or non-ASCII names), written entry by entry as it is walked.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pyfuse3 import FUSEError

from fluidfs.fs.snapshots import SNAPDIR_INO, SnapshotView

CHUNK = 256 * 1024
BLOCK = tarfile.BLOCKSIZE


class NotFound(Exception):
    """No such snapshot or path (the message says which)."""


def split_path(path: str) -> list[bytes]:
    """'/a/b' → [b'a', b'b'] (file-system encoding); '.', '..' and empty parts refused."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise NotFound("paths may not contain . or ..")
    return [os.fsencode(p) for p in parts]


def text(name: bytes) -> str:
    """A name as text for JSON (undecodable bytes kept as surrogate escapes)."""
    return os.fsdecode(name)


@dataclass
class Browser:
    """The snapshots as folders and files, for the API."""

    view: SnapshotView

    async def resolve(self, snapshot: str, parts: list[bytes]) -> int:
        """The view inode of *parts* in *snapshot* (NotFound if missing)."""
        try:
            ino = (await self.view.lookup(SNAPDIR_INO, os.fsencode(snapshot))).ino
            for name in parts:
                ino = (await self.view.lookup(ino, name)).ino
        except FUSEError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotFound(f"{snapshot}/{b'/'.join(parts).decode(errors='replace')} "
                               "is not in the snapshot") from None
            raise
        return ino

    def is_dir(self, ino: int) -> bool:
        """True for a folder of the view."""
        return self.view.inode(ino).is_dir

    async def listing(self, ino: int) -> list[dict]:
        """The entries of a folder: name, kind, size, modification time."""
        rows = []
        for name, child in await self.view.listing(ino):
            node = self.view.inode(child)
            kind = ("dir" if node.is_dir else "file" if node.is_reg
                    else "link" if stat.S_ISLNK(node.mode) else "other")
            rows.append({"name": text(name), "type": kind, "size": node.size,
                         "mtime": node.mtime_ns / 1e9})
        return rows

    def size(self, ino: int) -> int:
        """A file's size in bytes."""
        return self.view.inode(ino).size

    async def file(self, ino: int) -> AsyncIterator[bytes]:
        """The bytes of a file, a chunk at a time."""
        size = self.view.inode(ino).size
        offset = 0
        while offset < size:
            chunk = await self.view.read(ino, offset, min(CHUNK, size - offset))
            if not chunk:
                return
            yield chunk
            offset += len(chunk)

    async def tar(self, ino: int, top: str) -> AsyncIterator[bytes]:
        """A tar stream of the folder *ino*, its entries under *top*/."""
        async for piece in self._entries(ino, top):
            yield piece
        yield bytes(2 * BLOCK)

    async def _entries(self, ino: int, path: str) -> AsyncIterator[bytes]:
        node = self.view.inode(ino)
        info = tarfile.TarInfo(path)
        info.mode = stat.S_IMODE(node.mode)
        info.mtime = node.mtime_ns // 1_000_000_000
        info.uid, info.gid = node.uid, node.gid
        if node.is_dir:
            info.type = tarfile.DIRTYPE
            yield _header(info)
            for name, child in await self.view.listing(ino):
                async for piece in self._entries(child, f"{path}/{text(name)}"):
                    yield piece
        elif node.is_reg:
            info.size = node.size
            yield _header(info)
            async for chunk in self.file(ino):
                yield chunk
            if node.size % BLOCK:
                yield bytes(BLOCK - node.size % BLOCK)
        elif stat.S_ISLNK(node.mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.fsdecode(node.target)
            yield _header(info)
        # devices, fifos and sockets are left out of a download


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
