"""What the live tree holds that a committed tree does not: the writes to keep.

``diverged`` walks the live tree from the root and compares each directory with the
same directory of a committed tree (its metadata nodes, fetched through the index).
A name is *diverged* when the committed directory has no entry of that name, or has
one whose type, mode, size, mtime, ctime or symlink target differ: every change made
through the mount (contents, attributes, xattrs, renames) moves the inode's ctime, so
an entry that still carries the committed attributes holds the committed data. A
directory missing from the committed tree is reported and so is all below it.
Names that were deleted since the commit are not reported: there is nothing to keep.
Lazy directories (fs/restore.py) are committed contents as they are: never diverged.

Each directory is listed in a worker thread; the walk keeps one directory's listing
and the stack of directories still to compare, never the whole tree.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

import trio

from fluidfs.fs.inode import Inode
from fluidfs.fs.metaformat import Entry
from fluidfs.fs.metaindex import MetaIndex
from fluidfs.fs.tree import ROOT_INO, Tree

_U64 = struct.Struct(">Q")


@dataclass(frozen=True)
class Diverged:
    """One live name the committed tree does not hold as it is now."""

    path: bytes  # relative to the root, "/"-separated
    inode: Inode


def same(inode: Inode, entry: Entry) -> bool:
    """The live inode still carries the committed entry's attributes (so its data)."""
    return (
        stat.S_IFMT(inode.mode) == stat.S_IFMT(entry.mode)
        and inode.mode == entry.mode
        and inode.size == entry.size
        and inode.mtime_ns == entry.mtime_ns
        and inode.ctime_ns == entry.ctime_ns
        and inode.target == entry.target
    )


def _listing(tree: Tree, ino: int) -> tuple[list[tuple[bytes, Inode]], bool]:
    """(name, inode) of every entry of live directory *ino*, and whether it is lazy."""
    with tree.db.read() as txn:
        if txn.get(_U64.pack(ino), db=tree.db["lazy"]) is not None:
            return [], True
        out = []
        for _cookie, name, child in tree.entries_in(txn, ino):
            inode = tree.inode_in(txn, child)
            if inode is not None:
                out.append((name, inode))
        return out, False


async def diverged(tree: Tree, index: MetaIndex, committed_top: bytes | None,
                   *, whole: bool = False) -> list[Diverged]:
    """The live names that differ from the committed tree whose root directory's top
    node is *committed_top* (None: an empty root). With *whole*, every live name counts
    (there is no committed tree to compare with). Parents come before their children."""
    found: list[Diverged] = []
    # (live directory, its committed top node or None, its path, everything counts)
    stack: list[tuple[int, bytes | None, bytes, bool]] = [(ROOT_INO, committed_top, b"", whole)]
    while stack:
        ino, top, path, new = stack.pop()
        listing, lazy = await trio.to_thread.run_sync(_listing, tree, ino)
        if lazy:
            continue
        committed: dict[bytes, Entry] = {}
        if not new and top is not None:
            committed = {e.name: e for e in await index.entries(top)}
        for name, inode in listing:
            child_path = path + b"/" + name if path else name
            entry = committed.get(name)
            if inode.is_dir:
                known = entry is not None and stat.S_ISDIR(entry.mode)
                if not known:
                    found.append(Diverged(child_path, inode))
                child_top = entry.content.block_id if known and entry.content else None
                stack.append((inode.ino, child_top, child_path, not known))
            elif entry is None or not same(inode, entry):
                found.append(Diverged(child_path, inode))
    return found
