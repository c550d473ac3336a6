"""Writes this state directory acknowledged but never got into the backup: kept, not lost.

A mount that lost the writer lease (taken over while cut off, partitioned, offline)
may hold acknowledged writes that no published commit has, while the network moved on
to a newer tree written elsewhere. At its next mount (remount/gate.py), instead of
refusing the state directory as behind the network:

1. ``rescue`` finds what differs between the live tree and the last tree both
   histories share — the newest snapshot this state directory and the newer tree's
   snapshot list both hold (same commit number and time); everything, if there is none
   — (fs/divergence.py) and
   copies it into a *spool*, ``<state>/conflicts/<host>-<UTC time>/``, made durable
   before anything is dropped;
2. drops the local tree (its inodes, their data references, the local heads the newer
   tree's numbering overtakes) and adopts the newest root like a fresh machine does
   (remount/restore.py);
3. ``import_pending`` copies every complete spool into the live tree as
   ``.fluidfs-conflicts/<host>-<UTC time>/<path>``, tells the commit loop, and only
   then deletes the spool. A crash at any step leaves the spool, imported at the next
   mount (a name already imported is replaced).

Spool format (version 1): ``data/<n>`` holds the contents of the n-th entry that is a
regular file; ``manifest`` is written last (temp file, fsync, rename, directory fsync),
so a spool without it is incomplete and is discarded: a CBOR map
``{"v": 1, "host": str, "time": ns, "replaced_by": str, "entries":
[[path, mode, uid, gid, atime_ns, mtime_ns, rdev, target, [[xattr, value], ...],
data index or -1], ...]}``, parents before children.

Copies keep contents, type, mode, owner, times, symlink targets, device numbers and
xattrs; hard links become separate files. Every step that grows with the tree runs in
worker threads or in batches of ``BATCH`` inodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import cbor2
import trio

from fluidfs.fs.commit import DIRTY_KEY, Committer
from fluidfs.fs.divergence import Diverged, diverged
from fluidfs.fs.filedata import FileData
from fluidfs.fs.inode import Inode, now_ns
from fluidfs.fs.metaformat import Entry
from fluidfs.fs.metaindex import MetaIndex
from fluidfs.fs.restore import Restorer
from fluidfs.fs.snapshots import Snapshot, SnapshotStore
from fluidfs.fs.tree import ROOT_INO, Tree
from fluidfs.peers.rootrecord import Found
from fluidfs.remount.restore import TreeRestore
from fluidfs.wire import cbor

log = logging.getLogger(__name__)

FOLDER = b".fluidfs-conflicts"
SPOOL_VERSION = 1
CHUNK = 1 << 20  # bytes of one file copied at a time
BATCH = 256  # inodes dropped per batch


def folder_name(host: str, when_ns: int) -> str:
    """``<host>-<UTC time>``, the time as snapshots name theirs (2026-05-01T12:30:05Z)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when_ns / 1e9))
    return f"{host.replace('/', '_') or 'host'}-{stamp}"


def common_ancestor(ours: list[Snapshot], theirs: list[Entry]) -> Snapshot | None:
    """The newest of our snapshots that the newer tree's snapshot list also holds (same
    commit number and time): the last tree both histories share, or None."""
    shared = {(e.seq, e.when) for e in theirs}
    common = [s for s in ours if (s.seq, s.when) in shared]
    return max(common, key=lambda s: (s.when, s.seq)) if common else None


class Conflicts:
    """Keeps a replaced mount's unpublished writes and brings them into the live tree."""

    def __init__(
        self,
        spool_root: Path,
        tree: Tree,
        data: FileData,
        index: MetaIndex,
        committer: Committer,
        restorer: Restorer,
        restore: TreeRestore,
        snapshots: SnapshotStore,
        *,
        on_change: Callable[[], None],
        host: Callable[[], str] = socket.gethostname,
    ) -> None:
        self.spool_root = spool_root
        self.tree = tree
        self.data = data
        self.index = index
        self.committer = committer
        self.restorer = restorer
        self.restore = restore
        self.snapshots = snapshots
        self.on_change = on_change
        self.host = host

    # --- at mount ------------------------------------------------------------------------

    async def rescue(self, found: Found) -> int:
        """Spool what this state holds beyond its last published commit, drop the local
        tree and adopt *found* (the newer root written elsewhere). Returns how many
        names were spooled."""
        fetched = await self.restore.fetch(found)
        base = common_ancestor(self.snapshots.list(), fetched.snaps)
        if base is not None:
            changed = await diverged(self.tree, self.index, base.tree)
        else:
            changed = await diverged(self.tree, self.index, None, whole=True)
        # A complete spool left now is this same rescue, cut short by a crash before the
        # tree was dropped: the tree has not changed since, and that spool has it all.
        if changed and not await trio.to_thread.run_sync(self._complete_spools):
            when = time.time_ns()
            name = folder_name(self.host(), when)
            by = f"commit {found.seq} of host {found.body.get('host', '?')}"
            await self._spool(name, changed, when, by)
        await self._drop_local(found.seq)
        await self.restore.adopt(found, fetched)
        return len(changed)

    async def import_pending(self) -> list[str]:
        """Copy every complete spool into the live tree; return the folders made."""
        names = await trio.to_thread.run_sync(self._spools)
        done = []
        for name in names:
            spool = self.spool_root / name
            manifest = await trio.to_thread.run_sync(_read_manifest, spool)
            if manifest is None:
                log.warning("discarding an incomplete conflicts spool %s (made before a "
                            "crash, before anything was dropped)", spool)
                await trio.to_thread.run_sync(shutil.rmtree, spool)
                continue
            count = await self._import(name, spool, manifest)
            self.on_change()
            log.warning(
                "%d writes this state directory acknowledged on host %s but never published "
                "(the backup moved on to %s) are kept in %s/%s/ of the live tree",
                count, manifest["host"], manifest["replaced_by"], FOLDER.decode(), name,
            )
            await trio.to_thread.run_sync(shutil.rmtree, spool)
            done.append(name)
        return done

    def present(self) -> list[str]:
        """The folders in the live ``.fluidfs-conflicts/`` (empty when there is none)."""
        folder = self.tree.lookup(ROOT_INO, FOLDER)
        if folder is None:
            return []
        return sorted(os.fsdecode(name) for _c, name, _i in self.tree.entries(folder))

    # --- the spool -----------------------------------------------------------------------

    def _new_spool(self, name: str) -> Path:
        """A new spool directory named *name* (``.N`` appended if taken, as snapshots do)."""
        self.spool_root.mkdir(exist_ok=True)
        for n in range(1, 1000):
            spool = self.spool_root / (name if n == 1 else f"{name}.{n}")
            try:
                spool.mkdir()
            except FileExistsError:
                continue
            (spool / "data").mkdir()
            return spool
        raise FileExistsError(self.spool_root / name)

    def _complete_spools(self) -> list[str]:
        return [n for n in self._spools() if _read_manifest(self.spool_root / n) is not None]

    def _spools(self) -> list[str]:
        if not self.spool_root.is_dir():
            return []
        return sorted(p.name for p in self.spool_root.iterdir() if p.is_dir())

    async def _spool(self, name: str, changed: list[Diverged], when: int, by: str) -> None:
        spool = await trio.to_thread.run_sync(self._new_spool, name)
        entries = []
        files = 0
        for item in changed:
            inode = item.inode
            index = -1
            if inode.is_reg:
                index = files
                files += 1
                await self._copy_out(inode, spool / "data" / str(index))
            xattrs = [[n, self.tree.xattr(inode.ino, n) or b""]
                      for n in self.tree.xattr_names(inode.ino)]
            entries.append([item.path, inode.mode, inode.uid, inode.gid, inode.atime_ns,
                            inode.mtime_ns, inode.rdev, inode.target, xattrs, index])
        manifest = {"v": SPOOL_VERSION, "host": self.host(), "time": when,
                    "replaced_by": by, "entries": entries}
        await trio.to_thread.run_sync(_write_manifest, spool, manifest)

    async def _copy_out(self, inode: Inode, path: Path) -> None:
        fd = await trio.to_thread.run_sync(
            lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        )
        try:
            for offset in range(0, inode.size, CHUNK):
                chunk = await self.data.read(inode, offset, CHUNK)
                await trio.to_thread.run_sync(_write_all, fd, chunk)
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    # --- dropping the local tree ---------------------------------------------------------

    async def _drop_local(self, newer_seq: int) -> None:
        """Forget the local tree and the heads numbered like the newer tree's."""
        heads = self.committer.heads
        overtaken = [h for h in heads.all() if h.seq >= newer_seq]
        if overtaken:
            with self.tree.db.write() as txn:
                for head in overtaken:
                    heads.delete(txn, head.seq)
                self.index.journal_drops(txn, [h.node for h in overtaken])
            await self.index.drain()
        after = ROOT_INO
        while True:
            batch = await trio.to_thread.run_sync(self._inodes_after, after)
            if not batch:
                break
            for ino in batch:
                await self.data.remove(ino)
            with self.tree.db.write() as txn:
                for ino in batch:
                    self.tree.delete(txn, ino)
            after = batch[-1]
        await trio.to_thread.run_sync(self._clear_tables)
        heads.set_flag(DIRTY_KEY, None)

    def _inodes_after(self, after: int) -> list[int]:
        with self.tree.db.read() as txn:
            cursor = txn.cursor(db=self.tree.db["inodes"])
            out: list[int] = []
            if cursor.set_range((after + 1).to_bytes(8, "big")):
                for key in cursor.iternext(values=False):
                    out.append(int.from_bytes(key, "big"))
                    if len(out) >= BATCH:
                        break
            return out

    def _clear_tables(self) -> None:
        db = self.tree.db
        with db.write() as txn:
            for table in ("dirents", "cookies", "lazy"):
                txn.drop(db[table], delete=False)
            root = self.tree.inode_in(txn, ROOT_INO)
            self.tree.delete(txn, ROOT_INO)  # and its xattrs
            if root is not None:
                root.nlink = 2
                self.tree.put(txn, root)

    # --- into the live tree --------------------------------------------------------------

    async def _import(self, name: str, spool: Path, manifest: dict) -> int:
        await self.restorer.ensure(ROOT_INO)
        folder = self._dir(ROOT_INO, FOLDER, 0o755)
        top = self._dir(folder, os.fsencode(name), 0o755)
        dirs: dict[bytes, int] = {b"": top}
        for path, mode, uid, gid, atime, mtime, rdev, target, xattrs, index in manifest["entries"]:
            parent = self._parent(dirs, path)
            base = path.rsplit(b"/", 1)[-1]
            if stat.S_ISDIR(mode):
                dirs[path] = self._dir(parent, base, mode, uid, gid)
                ino = dirs[path]
            else:
                ino = self._new(parent, base, Inode(0, mode, uid, gid, rdev=rdev,
                                                    target=target, size=len(target)))
                if index >= 0:
                    await self._copy_in(ino, spool / "data" / str(index))
            inode = self.tree.get(ino)
            inode.atime_ns, inode.mtime_ns = atime, mtime
            self.tree.save(inode)
            for xname, value in xattrs:
                self.tree.set_xattr(ino, xname, value)
        return len(manifest["entries"])

    def _parent(self, dirs: dict[bytes, int], path: bytes) -> int:
        """The copy's parent directory, made (0755) where the spool did not list it."""
        head = path.rsplit(b"/", 1)[0] if b"/" in path else b""
        if head not in dirs:
            up = self._parent(dirs, head)
            dirs[head] = self._dir(up, head.rsplit(b"/", 1)[-1], 0o755)
        return dirs[head]

    def _dir(self, parent: int, name: bytes, mode: int, uid: int | None = None,
             gid: int | None = None) -> int:
        """Directory *name* in *parent*: the existing one, or a new one."""
        existing = self.tree.lookup(parent, name)
        if existing is not None:
            inode = self.tree.get(existing)
            if inode is not None and inode.is_dir:
                return existing
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        new = Inode(0, mode, os.getuid() if uid is None else uid,
                    os.getgid() if gid is None else gid, nlink=2)
        return self._new(parent, name, new)

    def _new(self, parent: int, name: bytes, inode: Inode) -> int:
        """Link a new inode like *inode* as *name* in *parent*, replacing what was there."""
        t = now_ns()
        old = self.tree.lookup(parent, name)
        with self.tree.db.write() as txn:
            inode.ino = self.tree.new_ino(txn)
            inode.atime_ns = inode.mtime_ns = inode.ctime_ns = t
            self.tree.put(txn, inode)
            if old is not None:
                replaced = self.tree.inode_in(txn, old)
                if replaced is not None:
                    replaced.nlink = 0 if replaced.is_dir else max(0, replaced.nlink - 1)
                    self.tree.put(txn, replaced)  # nlink 0: dropped at the next start
            self.tree.link(txn, parent, name, inode.ino)
            up = self.tree.inode_in(txn, parent)
            if inode.is_dir:
                up.nlink += 1
            up.mtime_ns = up.ctime_ns = t
            self.tree.put(txn, up)
        return inode.ino

    async def _copy_in(self, ino: int, path: Path) -> None:
        fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                chunk = await trio.to_thread.run_sync(os.pread, fd, CHUNK, offset)
                if not chunk:
                    break
                inode = self.tree.get(ino)
                await self.data.write(inode, offset, chunk)
                offset += len(chunk)
                inode.size = max(inode.size, offset)
                self.tree.save(inode)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_manifest(spool: Path, manifest: dict) -> None:
    part = spool / "manifest.part"
    with open(part, "wb") as f:
        f.write(cbor2.dumps(manifest))
        f.flush()
        os.fsync(f.fileno())
    os.rename(part, spool / "manifest")
    for directory in (spool, spool.parent):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_manifest(spool: Path) -> dict | None:
    """The spool's manifest, or None while it is incomplete (or unreadable)."""
    with contextlib.suppress(FileNotFoundError):
        raw = (spool / "manifest").read_bytes()
        try:
            manifest = cbor.loads(raw)
        except ValueError:
            return None
        if _valid(manifest):
            return manifest
    return None


_ENTRY_TYPES = (bytes, int, int, int, int, int, int, bytes, list, int)


def _valid(manifest: object) -> bool:
    """A manifest of the documented shape (it is read back after crashes, so checked)."""
    if not isinstance(manifest, dict) or manifest.get("v") != SPOOL_VERSION:
        return False
    if not isinstance(manifest.get("host"), str) or not isinstance(
        manifest.get("replaced_by"), str
    ):
        return False
    entries = manifest.get("entries")
    if not isinstance(entries, list):
        return False
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == len(_ENTRY_TYPES)):
            return False
        if not all(isinstance(v, t) for v, t in zip(entry, _ENTRY_TYPES, strict=True)):
            return False
        if not entry[0] or entry[0].startswith(b"/") or b"\0" in entry[0] or any(
            part in (b"", b".", b"..") for part in entry[0].split(b"/")
        ):
            return False
        if not all(isinstance(x, list) and len(x) == 2 and all(isinstance(v, bytes) for v in x)
                   for x in entry[8]):
            return False
    return True
