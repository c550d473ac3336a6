"""A null pyfuse3 filesystem: names and sizes in dicts, data dropped (bench_create.py's floor).

    python contrib/bench/nullfs.py MOUNTPOINT     # serves until unmounted (fusermount3 -u)
    PYTHONPATH=. python contrib/bench/nullfs.py MOUNTPOINT --fast-loop  # fluidfs's loop

It answers the requests of a small-file create the way fluidfs does (writeback cache,
60 s attribute and entry timeouts, ENOATTR for xattrs, ENOSYS for flush) with no work
behind them, so ``bench_create.py --floor`` measures what the FUSE round trips alone
cost through pyfuse3 and trio on this machine. ``--fast-loop`` serves through
fluidfs's ``node/fuseloop.py`` (no scheduler turn per queued request), as the mount does.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

TIMEOUT = 60.0


class NullFS(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self) -> None:
        super().__init__()
        self.next_ino = 2
        self.modes = {pyfuse3.ROOT_INODE: stat.S_IFDIR | 0o755}
        self.sizes: dict[int, int] = {pyfuse3.ROOT_INODE: 0}
        self.names: dict[tuple[int, bytes], int] = {}
        self.next_fh = 1

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.entry_timeout = entry.attr_timeout = TIMEOUT
        entry.st_mode = self.modes[ino]
        entry.st_nlink = 1
        entry.st_uid, entry.st_gid = os.getuid(), os.getgid()
        entry.st_size = self.sizes[ino]
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = time.time_ns()
        return entry

    def _new(self, parent: int, name: bytes, mode: int) -> int:
        ino = self.next_ino
        self.next_ino += 1
        self.modes[ino], self.sizes[ino] = mode, 0
        self.names[(parent, name)] = ino
        return ino

    async def lookup(self, parent_inode, name, ctx=None):
        ino = self.names.get((parent_inode, name))
        if ino is None:
            raise FUSEError(errno.ENOENT)
        return self.attrs(ino)

    async def getattr(self, inode, ctx=None):
        return self.attrs(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            self.sizes[inode] = attr.st_size
        return self.attrs(inode)

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self.attrs(self._new(parent_inode, name, stat.S_IFDIR | mode))

    async def create(self, parent_inode, name, mode, flags, ctx):
        ino = self._new(parent_inode, name, stat.S_IFREG | mode)
        self.next_fh += 1
        return pyfuse3.FileInfo(fh=ino), self.attrs(ino)

    async def write(self, fh, off, buf):
        self.sizes[fh] = max(self.sizes[fh], off + len(buf))
        return len(buf)

    async def flush(self, fh):
        raise FUSEError(errno.ENOSYS)

    async def release(self, fh):
        pass

    async def getxattr(self, inode, name, ctx):
        raise FUSEError(pyfuse3.ENOATTR)

    async def opendir(self, inode, ctx):
        return inode

    async def releasedir(self, fh):
        pass


async def serve(fast: bool) -> None:
    """pyfuse3's session loop, through fluidfs's FastTrio if *fast*."""
    if not fast:
        await pyfuse3.main()
        return
    from fluidfs.node.fuseloop import fast_session_loop

    with fast_session_loop():
        await pyfuse3.main()


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--fast-loop"]
    options = set(pyfuse3.default_options) | {"fsname=nullfs"}
    pyfuse3.init(NullFS(), args[0], options)
    try:
        trio.run(serve, "--fast-loop" in sys.argv[1:])
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
