"""The pyfuse3 Operations: POSIX semantics over the metadata tree and file data.

Errors: every handler is guarded (once per request, ``handler``) so that no exception
but FUSEError escapes (one would end ``pyfuse3.main`` and the mount). An errno reaches
the caller only when the code chose it, by raising ``FUSEError`` (ENOENT for a name
that is not there, EEXIST, ENOTEMPTY, EROFS, ENAMETOOLONG, E2BIG/ERANGE/ENOATTR for
xattrs, ...), or when the disk holding the state directory is full (ENOSPC, which tells
the user what to do). Any other failure, an ``OSError`` from the node's own files
included, is logged and becomes EIO: a dirty file that vanished is the node's trouble,
not "no such file" for the writer.

Inode changes are transactional: a handler changes a copy of the cached inode
(``_edit``) and writes it in a ``_transaction``; if the transaction fails, the inodes it
wrote are dropped from the cache, so the next call sees what LMDB holds and a retry
starts from there.

Lookup counts are kept as pyfuse3 documents; an inode's data goes only when it has no
links, no lookups and no open handles.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from fluidfs.diskspace import is_disk_full
from fluidfs.fs.filedata import FileData
from fluidfs.fs.health import XATTR_REDUNDANCY, redundancy
from fluidfs.fs.inode import Inode, now_ns, tick_ns
from fluidfs.fs.tree import ROOT_INO, Tree

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_VALUE_MAX = 64 * 1024
XATTR_NAMESPACES = (b"user.",)
TIMEOUT = 60.0
# st_blksize: what cp and most tools size their buffers by. 1 MiB (the most a FUSE
# request carries with libfuse 3's max_pages) makes a copy into or out of the mount one
# request per MiB instead of eight.
BLKSIZE = 1024 * 1024
DISK_FULL_WARN_EVERY = 60.0  # seconds between "disk full" log lines

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(func: F) -> F:
    """Mark *func* as a FUSE request handler. ``FluidOperations.__init__`` guards each
    marked method of the instance once (``_guarded``): a subclass's override calling
    ``super()`` runs one guard per request, not one per class."""
    func._fuse_handler = True  # type: ignore[attr-defined]
    return func


def _guarded(ops: Any, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """*method* (bound to *ops*) as the kernel may call it, counted in ``ops.requests``:
    a deliberate FUSEError goes through; a full state disk becomes ENOSPC; anything else
    (an internal OSError too: its errno meant something to the node, not to the caller)
    becomes EIO plus a log line."""
    requests = ops.requests

    @functools.wraps(method)
    async def guard(*args: Any, **kwargs: Any) -> Any:
        requests[name] += 1
        try:
            return await method(*args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            if _state_disk_full(ops, exc):
                _warn_disk_full(name)
                raise FUSEError(errno.ENOSPC) from None
            log.exception("%s failed", name)
            raise FUSEError(errno.EIO) from None

    return guard


_full_warned_at = -DISK_FULL_WARN_EVERY


def _warn_disk_full(op: str) -> None:
    """Say once a minute, not once a request, that writes fail for want of space (the
    log itself is on that disk)."""
    global _full_warned_at
    now = time.monotonic()
    if now - _full_warned_at >= DISK_FULL_WARN_EVERY:
        _full_warned_at = now
        log.warning("%s: the disk holding the state directory is full: writers get ENOSPC", op)


def _state_disk_full(ops: Any, exc: Exception) -> bool:
    """Did a handler of the operations object *ops* fail because its disk is full?"""
    data = getattr(ops, "data", None)
    path = getattr(data, "dirty_dir", None)
    return path is not None and is_disk_full(exc, path)


@dataclass
class OpenFile:
    """One open file handle."""

    ino: int
    writable: bool


class InodeWrites:
    """The inodes written in one metadata transaction, joining the write-behind batch
    (store/batch.py); use as a context manager. If the transaction fails, the inodes
    written in it leave the cache, so nothing in memory claims a change that LMDB does
    not hold. (A class, not a generator context manager: every request that writes
    enters one.)"""

    __slots__ = ("_request", "tree", "txn", "written")

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.txn: Any = None
        self.written: list[int] = []

    def __enter__(self) -> InodeWrites:
        self._request = self.tree.db.batch.write()
        self.txn = self._request.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
        try:
            self._request.__exit__(kind, exc, tb)
        except BaseException:
            self._forget()
            raise
        if kind is not None:
            self._forget()

    def _forget(self) -> None:
        for ino in self.written:
            self.tree.uncache(ino)

    def put(self, inode: Inode, *, new: bool = False) -> None:
        """Write *inode* in this transaction (*new*: see ``Tree.put``)."""
        self.written.append(inode.ino)
        self.tree.put(self.txn, inode, new=new)


def absent() -> pyfuse3.EntryAttributes:
    """The answer to a lookup of a name that is not there: a negative entry (inode 0),
    which the kernel keeps for ``TIMEOUT`` like a positive one. Every change to a
    directory's names comes through this kernel's requests (which update its dentries)
    or says so (``invalidate_entry``: the web page's restore), so a repeated miss — a
    ``stat`` before a ``create``, a search along a path — costs no second request."""
    entry = pyfuse3.EntryAttributes()
    entry.entry_timeout = TIMEOUT
    return entry


def is_absent(entry: pyfuse3.EntryAttributes) -> bool:
    """True for ``lookup``'s answer for a name that is not there (see ``absent``)."""
    return entry.st_ino == 0


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FUSEError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FUSEError(errno.EINVAL)


def _check_xattr_name(name: bytes) -> None:
    if not name.startswith(XATTR_NAMESPACES):
        raise FUSEError(errno.ENOTSUP)
    if len(name) > 255:
        raise FUSEError(errno.ERANGE)


class FluidOperations(pyfuse3.Operations):
    """The filesystem as the kernel sees it."""

    enable_writeback_cache = True

    def __init__(
        self,
        tree: Tree,
        data: FileData,
        statfs_path: str,
        *,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__()
        self.may_write = may_write  # the writer lease is fresh (remount/leasekeeper.py)
        self.tree = tree
        self.data = data
        self.statfs_path = statfs_path
        self.lookups: defaultdict[int, int] = defaultdict(int)
        self.opens: defaultdict[int, int] = defaultdict(int)
        self.handles: dict[int, OpenFile] = {}
        self._next_fh = 1
        self.read_only = False
        # Requests the kernel sent, by operation (`fluidfs status --json`: fuse_requests):
        # what a workload costs in round trips, the figure small files are bound by.
        self.requests: defaultdict[str, int] = defaultdict(int)
        for name in dir(type(self)):
            if any(
                getattr(cls.__dict__.get(name), "_fuse_handler", False)
                for cls in type(self).__mro__
            ):
                setattr(self, name, _guarded(self, name, getattr(self, name)))

    # --- helpers ----------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self.tree.get(ino)
        if inode is None:
            raise FUSEError(errno.ENOENT)
        return inode

    def _dir(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if not inode.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return inode

    def _edit(self, ino: int) -> Inode:
        """A copy of the inode to change and write in a ``_transaction``.

        Take it after the handler's last await, so that no other handler changes the
        inode between the copy and the write."""
        return self._inode(ino).copy()

    def _transaction(self) -> InodeWrites:
        """A metadata write transaction for the inodes a handler changes (see
        ``InodeWrites``)."""
        return InodeWrites(self.tree)

    def _save(self, inode: Inode) -> None:
        """Write one changed inode in its own transaction."""
        with self._transaction() as writes:
            writes.put(inode)

    def attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """The inode as EntryAttributes for the kernel."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.ino
        entry.generation = 0
        entry.entry_timeout = TIMEOUT
        entry.attr_timeout = TIMEOUT
        entry.st_mode = inode.mode
        entry.st_nlink = inode.nlink
        entry.st_uid = inode.uid
        entry.st_gid = inode.gid
        entry.st_rdev = inode.rdev
        entry.st_size = inode.size
        entry.st_blksize = BLKSIZE
        entry.st_blocks = -(-inode.size // 512)
        entry.st_atime_ns = inode.atime_ns
        entry.st_mtime_ns = inode.mtime_ns
        entry.st_ctime_ns = inode.ctime_ns
        return entry

    def _writable(self) -> None:
        if self.read_only or not self.may_write():
            raise FUSEError(errno.EROFS)

    def _new_inode(
        self,
        writes: InodeWrites,
        parent: Inode,
        mode: int,
        ctx: pyfuse3.RequestContext,
        *,
        rdev: int = 0,
        target: bytes = b"",
    ) -> Inode:
        # A regular file's times are the kernel's under the writeback cache: it stamps
        # them at each write(2) and sends them in a setattr when the file is closed, but
        # only if they changed. Stamped from the kernel's own clock (the timer tick), a
        # new file written within the same tick keeps them: the small file's setattr
        # at close is not sent (one request of seven, docs/decisions.md).
        t = tick_ns() if stat.S_ISREG(mode) and self.enable_writeback_cache else now_ns()
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        inode = Inode(
            self.tree.new_ino(writes.txn),
            mode,
            ctx.uid,
            gid,
            nlink=2 if stat.S_ISDIR(mode) else 1,
            size=len(target),
            rdev=rdev,
            atime_ns=t,
            mtime_ns=t,
            ctime_ns=t,
            target=target,
        )
        writes.put(inode, new=True)
        return inode

    def _make(
        self,
        parent_ino: int,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
        *,
        rdev: int = 0,
        target: bytes = b"",
    ) -> Inode:
        self._writable()
        _check_name(name)
        self._dir(parent_ino)
        if self.tree.lookup(parent_ino, name) is not None:
            raise FUSEError(errno.EEXIST)
        parent = self._edit(parent_ino)
        with self._transaction() as writes:
            inode = self._new_inode(writes, parent, mode, ctx, rdev=rdev, target=target)
            self.tree.link(writes.txn, parent_ino, name, inode.ino)
            if inode.is_dir:
                parent.nlink += 1
            parent.touch(mtime=True, ctime=True)
            writes.put(parent)
        self.lookups[inode.ino] += 1
        return inode

    async def _maybe_purge(self, ino: int) -> None:
        """Delete an inode once nothing refers to it any more."""
        inode = self.tree.get(ino)
        if inode is None or inode.nlink > 0 or self.lookups.get(ino) or self.opens.get(ino):
            return
        await self.data.remove(ino)
        with self.tree.db.write() as txn:
            self.tree.delete(txn, ino)

    # --- lookups and attributes -------------------------------------------------------

    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if name == b".":
            ino = parent_inode
        elif name == b"..":
            raise FUSEError(errno.ENOENT)  # the kernel resolves ".." itself
        else:
            ino = self.tree.lookup(parent_inode, name)
            if ino is None:
                return absent()
        inode = self._inode(ino)
        self.lookups[ino] += 1
        return self.attrs(inode)

    async def forget(self, inode_list):
        self.requests["forget"] += 1
        for ino, count in inode_list:
            try:
                left = self.lookups[ino] - count
                if left > 0:
                    self.lookups[ino] = left
                    continue
                self.lookups.pop(ino, None)
                if not self.opens.get(ino):
                    await self._maybe_purge(ino)
                    if ino != ROOT_INO:
                        self.tree.uncache(ino)
            except Exception:
                log.exception("forget of inode %d failed", ino)

    @handler
    async def getattr(self, inode, ctx=None):
        return self.attrs(self._inode(inode))

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._writable()
        node = self._inode(inode)
        if fields.update_size:
            if node.is_dir:
                raise FUSEError(errno.EISDIR)
            if attr.st_size < node.size:
                await self.data.truncate(node, attr.st_size)
        node = self._edit(inode)
        if fields.update_size:
            node.size = attr.st_size
            node.touch(mtime=True, ctime=True)
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        if fields.update_ctime:
            node.ctime_ns = attr.st_ctime_ns
        else:
            node.ctime_ns = now_ns()
        self._save(node)
        return self.attrs(node)

    @handler
    async def statfs(self, ctx):
        disk = os.statvfs(self.statfs_path)
        out = pyfuse3.StatvfsData()
        out.f_bsize = disk.f_bsize
        out.f_frsize = disk.f_frsize
        out.f_blocks = disk.f_blocks
        out.f_bfree = disk.f_bfree
        out.f_bavail = disk.f_bavail
        out.f_files = 1 << 40
        out.f_ffree = 1 << 39
        out.f_favail = 1 << 39
        out.f_namemax = NAME_MAX
        return out

    # --- directories ------------------------------------------------------------------

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self.attrs(self._make(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self.attrs(self._make(parent_inode, name, mode, ctx, rdev=rdev))

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        return self.attrs(self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target))

    @handler
    async def readlink(self, inode, ctx):
        node = self._inode(inode)
        if not stat.S_ISLNK(node.mode):
            raise FUSEError(errno.EINVAL)
        return node.target

    @handler
    async def opendir(self, inode, ctx):
        self._dir(inode)
        return inode

    @handler
    async def readdir(self, fh, start_id, token):
        listed = []
        for cookie, name, node in self.tree.listing(fh, start_id):
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self.attrs(node), cookie):
                break
            self.lookups[node.ino] += 1
            if stat.S_ISREG(node.mode):
                listed.append(node)
        # A copy reads next what it listed: once it opens one of these files, the
        # blocks of the small ones are fetched ahead (a find opens none: nothing is).
        self.data.listed(fh, listed, restart=start_id == 0)

    @handler
    async def releasedir(self, fh):
        pass

    @handler
    async def fsyncdir(self, fh, datasync):
        await self._sync()

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        self._writable()
        self._dir(parent_inode)
        ino = self.tree.lookup(parent_inode, name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        self._dir(ino)
        if not self.tree.is_empty(ino):
            raise FUSEError(errno.ENOTEMPTY)
        node, parent = self._edit(ino), self._edit(parent_inode)
        with self._transaction() as writes:
            self.tree.unlink(writes.txn, parent_inode, name)
            node.nlink = 0
            node.touch(ctime=True)
            writes.put(node)
            parent.nlink -= 1
            parent.touch(mtime=True, ctime=True)
            writes.put(parent)
        await self._maybe_purge(ino)

    @handler
    async def unlink(self, parent_inode, name, ctx):
        self._writable()
        self._dir(parent_inode)
        ino = self.tree.lookup(parent_inode, name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        if self._inode(ino).is_dir:
            raise FUSEError(errno.EISDIR)
        node, parent = self._edit(ino), self._edit(parent_inode)
        with self._transaction() as writes:
            self.tree.unlink(writes.txn, parent_inode, name)
            node.nlink -= 1
            node.touch(ctime=True)
            writes.put(node)
            parent.touch(mtime=True, ctime=True)
            writes.put(parent)
        await self._maybe_purge(ino)

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._writable()
        _check_name(new_name)
        if self._inode(inode).is_dir:
            raise FUSEError(errno.EPERM)
        self._dir(new_parent_inode)
        if self.tree.lookup(new_parent_inode, new_name) is not None:
            raise FUSEError(errno.EEXIST)
        node, parent = self._edit(inode), self._edit(new_parent_inode)
        with self._transaction() as writes:
            self.tree.link(writes.txn, new_parent_inode, new_name, inode)
            node.nlink += 1
            node.touch(ctime=True)
            writes.put(node)
            parent.touch(mtime=True, ctime=True)
            writes.put(parent)
        self.lookups[inode] += 1
        return self.attrs(node)

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._writable()
        _check_name(name_new)
        self._dir(parent_inode_old)
        self._dir(parent_inode_new)
        ino = self.tree.lookup(parent_inode_old, name_old)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        moved = self._inode(ino)
        target_ino = self.tree.lookup(parent_inode_new, name_new)
        target = self.tree.get(target_ino) if target_ino is not None else None
        if flags & pyfuse3.RENAME_NOREPLACE and target is not None:
            raise FUSEError(errno.EEXIST)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if target is None:
                raise FUSEError(errno.ENOENT)
            self._exchange(parent_inode_old, name_old, ino, parent_inode_new, name_new, target.ino)
            return
        if target_ino == ino:
            return  # both names are links to one file: nothing to do
        if target is not None:
            if target.is_dir:
                if not moved.is_dir:
                    raise FUSEError(errno.EISDIR)
                if not self.tree.is_empty(target.ino):
                    raise FUSEError(errno.ENOTEMPTY)
            elif moved.is_dir:
                raise FUSEError(errno.ENOTDIR)
        parents = self._edit_parents(parent_inode_old, parent_inode_new)
        old_parent, new_parent = parents[parent_inode_old], parents[parent_inode_new]
        node = self._edit(ino)
        with self._transaction() as writes:
            if target is not None:
                target = self._edit(target.ino)
                target.nlink = 0 if target.is_dir else target.nlink - 1
                if target.is_dir:
                    new_parent.nlink -= 1
                target.touch(ctime=True)
                writes.put(target)
            self.tree.unlink(writes.txn, parent_inode_old, name_old)
            self.tree.link(writes.txn, parent_inode_new, name_new, ino)
            if node.is_dir and old_parent is not new_parent:
                old_parent.nlink -= 1
                new_parent.nlink += 1
            node.touch(ctime=True)
            writes.put(node)
            for parent in parents.values():
                parent.touch(mtime=True, ctime=True)
                writes.put(parent)
        if target is not None:
            await self._maybe_purge(target.ino)

    def _edit_parents(self, old: int, new: int) -> dict[int, Inode]:
        """Copies of the two parent directories of a rename (one if they are the same)."""
        return {ino: self._edit(ino) for ino in dict.fromkeys((old, new))}

    def _exchange(
        self, old_parent_ino: int, name_old: bytes, ino: int, new_parent_ino: int,
        name_new: bytes, target_ino: int,
    ) -> None:
        parents = self._edit_parents(old_parent_ino, new_parent_ino)
        old_parent, new_parent = parents[old_parent_ino], parents[new_parent_ino]
        node, target = self._edit(ino), self._edit(target_ino)
        with self._transaction() as writes:
            self.tree.link(writes.txn, old_parent_ino, name_old, target_ino)
            self.tree.link(writes.txn, new_parent_ino, name_new, ino)
            if old_parent is not new_parent and node.is_dir != target.is_dir:
                shift = 1 if node.is_dir else -1
                old_parent.nlink -= shift
                new_parent.nlink += shift
            for inode in (node, target):
                inode.touch(ctime=True)
                writes.put(inode)
            for parent in parents.values():
                parent.touch(mtime=True, ctime=True)
                writes.put(parent)

    # --- files ------------------------------------------------------------------------

    def _open_handle(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.handles[fh] = OpenFile(ino, writable)
        self.opens[ino] += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @handler
    async def open(self, inode, flags, ctx):
        node = self._inode(inode)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            self._writable()
        if flags & os.O_TRUNC and node.size:
            await self.data.truncate(node, 0)
            node = self._edit(inode)
            node.size = 0
            node.touch(mtime=True, ctime=True)
            self._save(node)
        self.data.opened(inode)
        return self._open_handle(inode, flags)

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self._make(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        return self._open_handle(node.ino, flags), self.attrs(node)

    @handler
    async def read(self, fh, off, size):
        handle = self.handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        return await self.data.read(self._inode(handle.ino), off, size)

    @handler
    async def write(self, fh, off, buf):
        handle = self.handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        self._writable()
        await self.data.write(self._inode(handle.ino), off, buf)
        end = off + len(buf)
        if not self.enable_writeback_cache:
            node = self._edit(handle.ino)
            node.size = max(node.size, end)
            node.touch(mtime=True, ctime=True)
            self._save(node)
        elif end > self._inode(handle.ino).size:
            # Under the writeback cache the kernel owns mtime and ctime: it stamped them
            # at the write(2) and sends them in a setattr if they changed. Stamping them
            # here too would leave this inode with times the kernel never showed (a
            # write in a new file's first tick sends no setattr to correct them).
            node = self._edit(handle.ino)
            node.size = end
            self._save(node)
        return len(buf)

    @handler
    async def flush(self, fh):
        # Nothing to do at close(): the kernel writes its cached pages back before it
        # sends FLUSH, and durability is fsync's. ENOSYS makes the kernel stop sending
        # FLUSH for this mount: one round trip less for every file closed.
        raise FUSEError(errno.ENOSYS)

    @handler
    async def fsync(self, fh, datasync):
        handle = self.handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        await self.data.seal_inode(handle.ino)
        await self._sync(data=True)

    async def _sync(self, *, data: bool = False) -> None:
        """Make the metadata durable (the requests' batch committed, then LMDB synced);
        with *data*, first the cached plaintext of every sealed block whose shards are
        not all placed yet (the fsync'd file's among them: they were sealed just before;
        syncing the others too costs each file one sync, once, and spares a map from
        inodes to blocks)."""
        self.tree.db.commit_batch()
        if data:
            await self.data.blocks.make_durable()
        await trio.to_thread.run_sync(self.tree.db.sync)
        await trio.to_thread.run_sync(self.data.blocks.shards.sync)

    @handler
    async def release(self, fh):
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        ino = handle.ino
        self.opens[ino] -= 1
        if self.opens[ino] <= 0:
            del self.opens[ino]
            if handle.writable:
                await self.data.closed(ino)
            await self._maybe_purge(ino)

    @handler
    async def access(self, inode, mode, ctx):
        self._inode(inode)
        return True

    # --- extended attributes ----------------------------------------------------------

    @handler
    async def setxattr(self, inode, name, value, ctx):
        self._writable()
        _check_xattr_name(name)
        if len(value) > XATTR_VALUE_MAX:
            raise FUSEError(errno.E2BIG)
        if name == XATTR_REDUNDANCY:
            return  # computed, not stored; accepted so that `cp -a` between mounts works
        self._inode(inode)
        self.tree.set_xattr(inode, name, value)
        node = self._edit(inode)
        node.touch(ctime=True)
        self._save(node)

    @handler
    async def getxattr(self, inode, name, ctx):
        node = self._inode(inode)
        if not name.startswith(XATTR_NAMESPACES):
            # Only names setxattr accepts are ever stored. The kernel asks for
            # security.capability before every write: answered without LMDB.
            raise FUSEError(pyfuse3.ENOATTR)
        if name == XATTR_REDUNDANCY and node.is_reg:
            if self.data.has_dirty(inode):
                return b"local"  # written but not sealed yet: on this node only
            return redundancy(self.tree, self.data.blocks, inode).encode()
        value = self.tree.xattr(inode, name)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode, ctx):
        # Computed attributes are readable by name but never listed (as Ceph does with
        # ceph.*): listed, `rsync -aX` into the mount would never converge and `cp -a` out
        # of it would plant them on other filesystems.
        self._inode(inode)
        return self.tree.xattr_names(inode)

    @handler
    async def removexattr(self, inode, name, ctx):
        self._writable()
        node = self._inode(inode)
        if not name.startswith(XATTR_NAMESPACES):
            # Only names setxattr accepts are ever stored. The kernel asks for
            # security.capability before every write: answered without LMDB.
            raise FUSEError(pyfuse3.ENOATTR)
        if name == XATTR_REDUNDANCY and node.is_reg:
            return  # computed, not stored: removing it is harmless, like setting it
        if not self.tree.set_xattr(inode, name, None):
            raise FUSEError(pyfuse3.ENOATTR)
        node = self._edit(inode)
        node.touch(ctime=True)
        self._save(node)
