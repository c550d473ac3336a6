"""Snapshots: the commits kept for later, their retention, and the read-only ``.snapshots/``.

Every commit that carries changes made through the mount adds a snapshot, named
by its UTC time (``2026-05-01T12:30:05Z``; a second one within the same second
gets ``.<seq>`` appended). A commit that only refreshes where shards are held
(top-ups, repairs) updates the newest snapshot in place instead. The kept
snapshots are written into every commit as a *snapshot list*: a chunked list of
entries (fs/metaformat.py) whose entries look like directories — the root
directory's attributes under the snapshot's name, with ``q`` (commit seq) and ``w``
(commit time) — so a fresh machine gets the history along with the tree.

Table ``snapshots`` of meta.lmdb (format version 1): key ``u64 seq`` of the commit
that made the snapshot → a one-entry leaf node (``metaformat.encode_leaf``) holding
that entry. The references are held by the snapshot list of the newest commit
head, not by this table.

Retention (``Retention``): keep every snapshot younger than ``all``, the newest
one of each hour for ``hourly``, of each day for ``daily``, of each ISO week for
``weekly``, of each month for ``monthly`` (UTC calendar); always keep the newest.
Default ``all=1d,hourly=7d,daily=90d``. A snapshot the policy no longer keeps is
left out of the next commit's list; its blocks go once that commit is published.

``SnapshotView`` serves ``<mount>/.snapshots``: not listed in the root directory
(so ``find``, ``du`` and ``rsync`` of the mount do not descend into history) but
there when named, read-only (EROFS), with inode numbers of its own from 2^60 up.
"""

from __future__ import annotations

import errno
import re
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from fluidfs.blocks.blockstore import BlockStore, BlockUnavailable
from fluidfs.fs.commit import CommitAborted
from fluidfs.fs.inode import Inode
from fluidfs.fs.metaformat import Entry, NodeError, decode_node, encode_leaf
from fluidfs.fs.metaindex import Holders, MetaError, MetaIndex
from fluidfs.store.db import Database

_U64 = struct.Struct(">Q")
SNAP_BASE = 1 << 60
SNAPDIR_INO = SNAP_BASE
SNAPDIR_NAME = b".snapshots"
NS = 1_000_000_000

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_RULES = ("all", "hourly", "daily", "weekly", "monthly")


def snapshot_name(when_ns: int) -> str:
    """A snapshot's name from its commit time (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when_ns // NS))


# --- retention -----------------------------------------------------------------------


def _duration(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smhdwy]?)", text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 36h, 7d, 12w, 1y)")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _human(seconds: int) -> str:
    for unit in ("y", "w", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Retention:
    """How long snapshots are kept, per rule (seconds; 0 = rule off)."""

    all: int = 86400
    hourly: int = 7 * 86400
    daily: int = 90 * 86400
    weekly: int = 0
    monthly: int = 0

    @classmethod
    def parse(cls, text: str) -> Retention:
        """Parse ``all=1d,hourly=7d,daily=90d`` (rules not named are off)."""
        values = dict.fromkeys(_RULES, 0)
        for part in text.split(","):
            if not part.strip():
                continue
            rule, sep, value = part.partition("=")
            rule = rule.strip()
            if not sep or rule not in values:
                raise ValueError(
                    f"bad retention rule {part.strip()!r}: use RULE=DURATION with RULE one of "
                    + ", ".join(_RULES)
                )
            values[rule] = _duration(value)
        return cls(**values)

    def __str__(self) -> str:
        parts = [f"{rule}={_human(getattr(self, rule))}" for rule in _RULES if getattr(self, rule)]
        return ",".join(parts) or "all=0s"

    def keep(self, snaps: list[tuple[int, int]], now_ns: int) -> dict[int, str]:
        """Which of (seq, time ns) to keep, each with the rule that keeps it."""
        if not snaps:
            return {}
        now = now_ns / NS
        kept: dict[int, str] = {max(snaps, key=lambda s: (s[1], s[0]))[0]: "newest"}
        buckets: dict[tuple[str, object], tuple[int, int]] = {}
        for seq, when_ns in snaps:
            when = when_ns / NS
            age = now - when
            if age <= self.all:
                kept.setdefault(seq, "all")
            t = time.gmtime(when)
            for rule, bucket in (
                ("hourly", int(when // 3600)),
                ("daily", int(when // 86400)),
                ("weekly", int((when // 86400 + 3) // 7)),
                ("monthly", (t.tm_year, t.tm_mon)),
            ):
                if age <= getattr(self, rule):
                    best = buckets.get((rule, bucket))
                    if best is None or (when_ns, seq) > (best[1], best[0]):
                        buckets[(rule, bucket)] = (seq, when_ns)
        for (rule, _), (seq, _) in sorted(buckets.items(), key=lambda kv: _RULES.index(kv[0][0])):
            kept.setdefault(seq, rule)
        return kept


# --- the kept snapshots ----------------------------------------------------------------


@dataclass
class Snapshot:
    """One kept snapshot."""

    seq: int
    entry: Entry  # name = snapshot name; attrs of the root directory; content = its tree

    @property
    def name(self) -> str:
        return self.entry.name.decode()

    @property
    def when(self) -> int:
        return self.entry.when

    @property
    def tree(self) -> bytes | None:
        return self.entry.content.block_id if self.entry.content is not None else None


@dataclass
class Plan:
    """How the next commit changes the snapshot list."""

    current: list[Snapshot]
    added: Snapshot | None = None
    refreshed: Snapshot | None = None
    expired: list[Snapshot] = field(default_factory=list)
    refresh_ref: Callable[[Entry], Entry] = lambda e: e

    @property
    def name(self) -> str | None:
        chosen = self.added or self.refreshed
        return chosen.name if chosen else None

    def changed(self) -> bool:
        return self.added is not None or self.refreshed is not None or bool(self.expired)

    def kept(self) -> list[Snapshot]:
        gone = {s.seq for s in self.expired}
        snaps = {s.seq: s for s in self.current if s.seq not in gone}
        for extra in (self.refreshed, self.added):
            if extra is not None and extra.seq not in gone:
                snaps[extra.seq] = extra
        return sorted(snaps.values(), key=lambda s: s.entry.name)

    def entries(self) -> list[Entry]:
        return [self.refresh_ref(s.entry) for s in self.kept()]

    def expired_names(self) -> list[str]:
        return [s.name for s in self.expired]


class SnapshotStore:
    """The ``snapshots`` table."""

    def __init__(self, db: Database, blocks: BlockStore, holders: Holders) -> None:
        self.db = db
        self.blocks = blocks
        self.holders = holders
        self._table = db["snapshots"]

    def list(self) -> list[Snapshot]:
        """Every kept snapshot, oldest first."""
        with self.db.read() as txn:
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._table)]
        out = []
        for key, raw in rows:
            try:
                (entry,) = decode_node(raw).entries
            except (NodeError, ValueError):
                continue
            out.append(Snapshot(_U64.unpack(key)[0], entry))
        return sorted(out, key=lambda s: (s.when, s.seq))

    def put(self, txn, snap: Snapshot) -> None:
        """Record a snapshot."""
        txn.put(_U64.pack(snap.seq), encode_leaf([snap.entry]), db=self._table)

    def replace_all(self, txn, snaps: list[Snapshot]) -> None:
        """Make the table hold exactly *snaps* (after a restore)."""
        txn.drop(self._table, delete=False)
        for snap in snaps:
            self.put(txn, snap)

    def _fresh(self, entry: Entry) -> Entry:
        """The entry with its tree reference's holders as they are now."""
        if entry.content is None:
            return entry
        stored = self.blocks.load(entry.content.block_id)
        if stored is None:
            raise CommitAborted(f"snapshot tree {entry.content.block_id.hex()[:16]} is gone")
        copy = Entry(**{f: getattr(entry, f) for f in entry.__dataclass_fields__})
        copy.content = self.holders.ref(stored)
        return copy

    def plan(
        self,
        root: Entry,
        tree_id: bytes | None,
        now_ns: int,
        *,
        seq: int,
        new: bool,
        retention: Retention | None,
    ) -> Plan:
        """What the next commit (number *seq*, tree *root*) does to the list."""
        current = self.list()
        plan = Plan(current, refresh_ref=self._fresh)
        entry = Entry(**{f: getattr(root, f) for f in root.__dataclass_fields__})
        entry.when = now_ns
        if new or not current:
            name = snapshot_name(now_ns)
            if any(s.name == name for s in current):
                name = f"{name}.{seq}"
            entry.name, entry.seq = name.encode(), seq
            plan.added = Snapshot(seq, entry)
        elif current[-1].tree != tree_id:
            last = current[-1]
            entry.name, entry.seq, entry.when = last.entry.name, last.seq, last.when
            plan.refreshed = Snapshot(last.seq, entry)
        if retention is not None:
            candidates = plan.kept()
            keep = retention.keep([(s.seq, s.when) for s in candidates], now_ns)
            plan.expired = [s for s in candidates if s.seq not in keep]
        return plan

    def apply(self, txn, plan: Plan) -> None:
        """Write the plan's changes to the table (in the commit's transaction)."""
        for snap in (plan.refreshed, plan.added):
            if snap is not None:
                self.put(txn, snap)
        for snap in plan.expired:
            txn.delete(_U64.pack(snap.seq), db=self._table)


# --- the read-only view ----------------------------------------------------------------


@dataclass
class _ViewNode:
    inode: Inode
    snap: int
    entry: Entry
    listing: list[tuple[bytes, int]] | None = None
    data: dict[int, tuple[bool, bytes]] | None = None  # index -> (is block id, bytes)


class SnapshotView:
    """``.snapshots/``: every kept snapshot as a read-only directory tree."""

    def __init__(
        self,
        store: SnapshotStore,
        index: MetaIndex,
        blocks: BlockStore,
        block_size: Callable[[], int],
        root_inode: Callable[[], Inode],
    ) -> None:
        self.store = store
        self.index = index
        self.blocks = blocks
        self.block_size = block_size
        self.root_inode = root_inode
        self._nodes: dict[int, _ViewNode] = {}
        self._ids: dict[tuple[int, int], int] = {}
        self._next = SNAP_BASE + 1
        self._locks: dict[int, trio.Lock] = {}

    @staticmethod
    def owns(ino: int) -> bool:
        """True for inodes of the view."""
        return ino >= SNAP_BASE

    def _node(self, snap: int, entry: Entry) -> int:
        key = (snap, entry.ino)
        ino = self._ids.get(key)
        if ino is None:
            ino = self._ids[key] = self._next
            self._next += 1
            self._nodes[ino] = _ViewNode(entry.inode(ino), snap, entry)
        return ino

    def _snapshots(self) -> list[tuple[bytes, int]]:
        return [(s.entry.name, self._node(s.seq, s.entry)) for s in self.store.list()]

    def inode(self, ino: int) -> Inode:
        """Attributes of a view inode (ENOENT if unknown)."""
        if ino == SNAPDIR_INO:
            root = self.root_inode()
            snaps = self.store.list()
            t = snaps[-1].when if snaps else root.mtime_ns
            return Inode(
                SNAPDIR_INO,
                stat.S_IFDIR | 0o555,
                root.uid,
                root.gid,
                nlink=2 + len(snaps),
                atime_ns=t,
                mtime_ns=t,
                ctime_ns=t,
            )
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node.inode

    async def listing(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, view inode) of a view directory, in name order."""
        if ino == SNAPDIR_INO:
            return self._snapshots()
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not stat.S_ISDIR(node.inode.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if node.listing is None:
            lock = self._locks.setdefault(ino, trio.Lock())
            async with lock:
                if node.listing is None:
                    entries = []
                    if node.entry.content is not None:
                        entries = await self._load(self.index.entries(node.entry.content.block_id))
                    node.listing = [(e.name, self._node(node.snap, e)) for e in entries]
        return node.listing

    async def lookup(self, parent: int, name: bytes) -> Inode:
        """The view inode named *name* in directory *parent*."""
        for child_name, child in await self.listing(parent):
            if child_name == name:
                return self.inode(child)
        raise pyfuse3.FUSEError(errno.ENOENT)

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        """The inode's extended attributes."""
        node = self._nodes.get(ino)
        return [] if node is None else node.entry.xattrs

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """File bytes of a view inode."""
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.data is None:
            blocks, inline = await self._load(self.index.file_blocks(node.entry))
            data = {i: (True, ref.block_id) for i, ref in blocks}
            data.update({i: (False, d) for i, d in inline})
            node.data = data
        end = min(offset + size, node.inode.size)
        bs = self.block_size()
        parts = []
        pos = offset
        while pos < end:
            index, start = divmod(pos, bs)
            want = min(bs - start, end - pos)
            kind, value = node.data.get(index, (False, b""))
            if kind:
                try:
                    chunk = await self.blocks.read(value, start, want)
                except BlockUnavailable:
                    raise pyfuse3.FUSEError(errno.EIO) from None
            else:
                chunk = value[start : start + want]
            parts.append(chunk + bytes(want - len(chunk)))
            pos += want
        return b"".join(parts)

    async def _load(self, coro):
        try:
            return await coro
        except MetaError:
            raise pyfuse3.FUSEError(errno.EIO) from None
