"""The FUSE operations with the two layers remounting adds on top of the live tree.

- Lazy directories (fs/restore.py): every operation that needs a directory's
  entries loads it first; a directory that cannot be fetched gives EIO.
- ``.snapshots`` (fs/snapshots.py): inodes from 2^60 up belong to the read-only
  snapshot view; anything that would change them fails with EROFS, and the name
  ``.snapshots`` cannot be created, removed or renamed in the root directory.

Every operation that changes the tree reports it (``on_change``) so that the next
commit knows there is something to commit.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from fluidfs.fs.metaindex import MetaError
from fluidfs.fs.operations import FluidOperations, handler
from fluidfs.fs.restore import Restorer
from fluidfs.fs.snapshots import SNAPDIR_INO, SNAPDIR_NAME, SnapshotView
from fluidfs.fs.tree import ROOT_INO


class LayeredOperations(FluidOperations):
    """FluidOperations plus lazily loaded directories and the snapshot view."""

    def __init__(
        self,
        *args: Any,
        restorer: Restorer | None = None,
        view: SnapshotView | None = None,
        on_change: Callable[[], None] = lambda: None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.restorer = restorer
        self.view = view
        self.on_change = on_change

    # --- helpers ------------------------------------------------------------------------

    def _in_view(self, ino: int) -> bool:
        return self.view is not None and self.view.owns(ino)

    def _is_snapdir(self, parent: int, name: bytes) -> bool:
        return self.view is not None and parent == ROOT_INO and name == SNAPDIR_NAME

    def _refuse_view(self, *inos: int) -> None:
        if any(self._in_view(ino) for ino in inos):
            raise FUSEError(errno.EROFS)

    async def _loaded(self, ino: int) -> None:
        if self.restorer is not None:
            try:
                await self.restorer.ensure(ino)
            except MetaError as exc:
                raise FUSEError(errno.EIO) from exc

    async def _loaded_child(self, parent: int, name: bytes) -> None:
        """Load the directory *name* in *parent* if it is one (rmdir/rename need its entries)."""
        ino = self.tree.lookup(parent, name)
        if ino is not None:
            node = self.tree.get(ino)
            if node is not None and node.is_dir:
                await self._loaded(ino)

    # --- reading ------------------------------------------------------------------------

    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        if self._in_view(parent_inode):
            if name == b".":
                return self.attrs(self.view.inode(parent_inode))
            node = await self.view.lookup(parent_inode, name)
            return self.attrs(node)
        if self._is_snapdir(parent_inode, name):
            return self.attrs(self.view.inode(SNAPDIR_INO))
        await self._loaded(parent_inode)
        return await super().lookup(parent_inode, name, ctx)

    @handler
    async def getattr(self, inode, ctx=None):
        if self._in_view(inode):
            return self.attrs(self.view.inode(inode))
        return await super().getattr(inode, ctx)

    @handler
    async def readlink(self, inode, ctx):
        if self._in_view(inode):
            node = self.view.inode(inode)
            if not node.target:
                raise FUSEError(errno.EINVAL)
            return node.target
        return await super().readlink(inode, ctx)

    @handler
    async def opendir(self, inode, ctx):
        if self._in_view(inode):
            if not self.view.inode(inode).is_dir:
                raise FUSEError(errno.ENOTDIR)
            return inode
        await self._loaded(inode)
        return await super().opendir(inode, ctx)

    @handler
    async def readdir(self, fh, start_id, token):
        if self._in_view(fh):
            listing = await self.view.listing(fh)
            for position, (name, ino) in enumerate(listing[start_id:], start_id + 1):
                attrs = self.attrs(self.view.inode(ino))
                if not pyfuse3.readdir_reply(token, name, attrs, position):
                    break
            return
        await self._loaded(fh)
        return await super().readdir(fh, start_id, token)

    @handler
    async def open(self, inode, flags, ctx):
        if self._in_view(inode):
            node = self.view.inode(inode)
            if node.is_dir:
                raise FUSEError(errno.EISDIR)
            if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
                raise FUSEError(errno.EROFS)
            return self._open_handle(inode, flags)
        info = await super().open(inode, flags, ctx)
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            self.on_change()
        return info

    @handler
    async def read(self, fh, off, size):
        handle = self.handles.get(fh)
        if handle is not None and self._in_view(handle.ino):
            return await self.view.read(handle.ino, off, size)
        return await super().read(fh, off, size)

    @handler
    async def getxattr(self, inode, name, ctx):
        if self._in_view(inode):
            for key, value in self.view.xattrs(inode):
                if key == name:
                    return value
            raise FUSEError(pyfuse3.ENOATTR)
        return await super().getxattr(inode, name, ctx)

    @handler
    async def listxattr(self, inode, ctx):
        if self._in_view(inode):
            return [key for key, _ in self.view.xattrs(inode)]
        return await super().listxattr(inode, ctx)

    @handler
    async def access(self, inode, mode, ctx):
        if self._in_view(inode):
            self.view.inode(inode)
            if mode & os.W_OK:
                raise FUSEError(errno.EROFS)
            return True
        return await super().access(inode, mode, ctx)

    @handler
    async def fsync(self, fh, datasync):
        handle = self.handles.get(fh)
        if handle is not None and self._in_view(handle.ino):
            return
        return await super().fsync(fh, datasync)

    # --- changing -----------------------------------------------------------------------

    async def _creating(self, parent: int, name: bytes) -> None:
        self._refuse_view(parent)
        if self._is_snapdir(parent, name):
            raise FUSEError(errno.EEXIST)
        await self._loaded(parent)

    def _changed(self, result: Any) -> Any:
        """Tell the committer the tree changed; pass *result* through."""
        self.on_change()
        return result

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._refuse_view(inode)
        return self._changed(await super().setattr(inode, attr, fields, fh, ctx))

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._creating(parent_inode, name)
        return self._changed(await super().mkdir(parent_inode, name, mode, ctx))

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._creating(parent_inode, name)
        return self._changed(await super().mknod(parent_inode, name, mode, rdev, ctx))

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        await self._creating(parent_inode, name)
        return self._changed(await super().symlink(parent_inode, name, target, ctx))

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._creating(parent_inode, name)
        return self._changed(await super().create(parent_inode, name, mode, flags, ctx))

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._refuse_view(inode)
        await self._creating(new_parent_inode, new_name)
        return self._changed(await super().link(inode, new_parent_inode, new_name, ctx))

    @handler
    async def unlink(self, parent_inode, name, ctx):
        self._refuse_view(parent_inode)
        if self._is_snapdir(parent_inode, name):
            raise FUSEError(errno.EROFS)
        await self._loaded(parent_inode)
        await super().unlink(parent_inode, name, ctx)
        self.on_change()

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        self._refuse_view(parent_inode)
        if self._is_snapdir(parent_inode, name):
            raise FUSEError(errno.EROFS)
        await self._loaded(parent_inode)
        await self._loaded_child(parent_inode, name)
        await super().rmdir(parent_inode, name, ctx)
        self.on_change()

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._refuse_view(parent_inode_old, parent_inode_new)
        if self._is_snapdir(parent_inode_old, name_old) or self._is_snapdir(
            parent_inode_new, name_new
        ):
            raise FUSEError(errno.EROFS)
        await self._loaded(parent_inode_old)
        await self._loaded(parent_inode_new)
        await self._loaded_child(parent_inode_new, name_new)
        await super().rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)
        self.on_change()

    @handler
    async def write(self, fh, off, buf):
        handle = self.handles.get(fh)
        if handle is not None and self._in_view(handle.ino):
            raise FUSEError(errno.EROFS)
        return self._changed(await super().write(fh, off, buf))

    @handler
    async def setxattr(self, inode, name, value, ctx):
        self._refuse_view(inode)
        await super().setxattr(inode, name, value, ctx)
        self.on_change()

    @handler
    async def removexattr(self, inode, name, ctx):
        self._refuse_view(inode)
        await super().removexattr(inode, name, ctx)
        self.on_change()
