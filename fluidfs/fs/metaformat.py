"""Metadata nodes, format version 1: how the tree is written into metadata blocks.

A commit writes the filesystem tree into *nodes*. Each node is the plaintext of one
block that goes through the ordinary block pipeline (keyed hash, AEAD, erasure code,
shards on peers), so nodes are encrypted, deduplicated and placed exactly like file
data; a node is identified by its block id. A node is one CBOR map::

    {"v": 1, "t": type, "p": [peer public key (32 bytes), ...], ...}

``p`` is the node's peer table: the public keys of the peers that hold shards of the
blocks the node refers to. A reference names holders by their position in this table,
so every node is self-contained (local holder indexes mean nothing on another machine).

Node types:

- ``"d"`` directory leaf: ``"e": [entry, ...]``, entries sorted by name (bytewise).
- ``"i"`` index: ``"h": height >= 1``, ``"c": [[first name, ref, entries below], ...]``.
- ``"f"`` file manifest chunk: ``"b": [[block index, ref], ...]``,
  ``"I": [[block index, inline bytes], ...]``.
- ``"c"`` commit: ``"seq"``, ``"time"`` (ns), ``"machine"`` (16 bytes), ``"root"``
  (the root directory's entry, name empty), ``"snaps"`` (ref of the snapshot list's top
  node; absent when there is none), ``"nsnaps"``, ``"next_ino"`` (first inode number
  never used), ``"bs"`` (the block size files are cut at).

A *reference* (ref) to a block is an array::

    [block id (32), size, shard size, K, wrapped key (72), nonce (24),
     shard ids (N x 32 bytes, concatenated), holders (N x u16 big-endian: index into
     "p", 0xFFFF = no holder)]

which is everything a machine holding only the keyfile needs to fetch, check and
decrypt the block (see blocks/codec.py).

An *entry* is a map with one-letter keys, each left out when it has its default (0,
empty): ``n`` name (bytes), ``i`` inode number, ``m`` mode, ``u`` uid, ``g`` gid,
``l`` nlink, ``s`` size, ``r`` rdev, ``a``/``M``/``c`` atime/mtime/ctime in ns,
``t`` symlink target (bytes), ``x`` [[xattr name, value], ...], ``b`` [[block index,
ref], ...] file blocks, ``I`` [[block index, bytes], ...] file data kept inline,
``B`` [[first block index, ref], ...] the manifest chunks ("f" nodes) of a large file
(in place of ``b``/``I``), ``d`` ref of a directory's contents (its top "d"/"i" node;
absent for an empty directory), and in snapshot lists ``q`` commit seq and ``w``
commit time (ns). Inode numbers are kept so hard links stay hard links.

A directory's contents, and the snapshot list, form a chunked tree: entries are cut
into leaves where a keyed hash of the name falls below the entry's share of
``NODE_TARGET`` bytes (so nodes hold about 32 KiB whatever the entries' sizes), which
depends only on that entry: adding or changing one entry rewrites one leaf (two if
the cut moves) and the index nodes above it. Leaves are grouped into index nodes the
same way, level by level, until one node is left.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import blake3
import cbor2

from fluidfs.blocks.codec import KEY_SIZE, NONCE_SIZE, WRAPPED_KEY_SIZE, BlockRecord
from fluidfs.fs.inode import Inode
from fluidfs.net import envelope

VERSION = 1
LEAF, INDEX, MANIFEST, COMMIT = "d", "i", "f", "c"
NO_HOLDER = 0xFFFF
MAX_PEERS = 0xFFFE
MAX_SHARDS = 256
ID_SIZE = 32
U64_MAX = 2**64 - 1

NODE_TARGET = 32 * 1024  # bytes per node on average
NODE_SIZE_CAP = 256 * 1024  # a node is cut here even without a hash boundary
MANIFEST_INLINE_BLOCKS = 64  # files with more blocks get "f" manifest chunks
MANIFEST_CHUNK_BLOCKS = 512  # block indexes per manifest chunk (fixed ranges)
REF_SIZE_ESTIMATE = 600


class NodeError(ValueError):
    """A metadata node that does not parse as format version 1."""


@dataclass(frozen=True)
class Ref:
    """A reference to a stored block: its record and the public keys of its holders."""

    record: BlockRecord
    holders: tuple[bytes | None, ...]

    @property
    def block_id(self) -> bytes:
        """The referenced block's id."""
        return self.record.block_id


@dataclass
class Entry:
    """One name in a directory (or one snapshot in the snapshot list)."""

    name: bytes
    ino: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    size: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    target: bytes = b""
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    blocks: list[tuple[int, Ref]] = field(default_factory=list)
    inline: list[tuple[int, bytes]] = field(default_factory=list)
    chunks: list[tuple[int, Ref]] = field(default_factory=list)
    content: Ref | None = None
    seq: int = 0
    when: int = 0

    def refs(self) -> Iterator[tuple[Ref, bool]]:
        """Every block this entry refers to, with whether it is a metadata node."""
        for _, ref in self.blocks:
            yield ref, False
        for _, ref in self.chunks:
            yield ref, True
        if self.content is not None:
            yield self.content, True

    def inode(self, ino: int | None = None) -> Inode:
        """The entry's attributes as an Inode."""
        return Inode(
            self.ino if ino is None else ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.size,
            self.rdev,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.target,
        )

    @classmethod
    def of_inode(cls, name: bytes, inode: Inode) -> Entry:
        """An entry carrying *inode*'s attributes (no data yet)."""
        return cls(
            name,
            inode.ino,
            inode.mode,
            inode.uid,
            inode.gid,
            inode.nlink,
            inode.size,
            inode.rdev,
            inode.atime_ns,
            inode.mtime_ns,
            inode.ctime_ns,
            inode.target,
        )

    def size_estimate(self) -> int:
        """Rough encoded size, for cutting nodes before they get too large."""
        return (
            64
            + len(self.name)
            + len(self.target)
            + sum(len(k) + len(v) + 4 for k, v in self.xattrs)
            + sum(len(d) + 12 for _, d in self.inline)
            + REF_SIZE_ESTIMATE
            * (len(self.blocks) + len(self.chunks) + (self.content is not None))
        )


@dataclass
class CommitInfo:
    """The contents of a commit node."""

    seq: int
    time_ns: int
    machine: bytes
    root: Entry
    snaps: Ref | None
    nsnaps: int
    next_ino: int
    block_size: int


@dataclass
class TreeNode:
    """A decoded node (only the fields of its type are filled)."""

    type: str
    entries: list[Entry] = field(default_factory=list)  # LEAF
    children: list[tuple[bytes, Ref, int]] = field(default_factory=list)  # INDEX
    height: int = 0
    blocks: list[tuple[int, Ref]] = field(default_factory=list)  # MANIFEST
    inline: list[tuple[int, bytes]] = field(default_factory=list)
    commit: CommitInfo | None = None  # COMMIT

    def refs(self) -> list[tuple[Ref, bool]]:
        """Every block the node refers to, with whether each is a metadata node."""
        found: list[tuple[Ref, bool]] = []
        for entry in self.entries:
            found.extend(entry.refs())
        found.extend((ref, True) for _, ref, _ in self.children)
        found.extend((ref, False) for _, ref in self.blocks)
        if self.commit is not None:
            found.extend(self.commit.root.refs())
            if self.commit.snaps is not None:
                found.append((self.commit.snaps, True))
        return found


# --- references ----------------------------------------------------------------------


class _PeerTable:
    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self._index: dict[bytes, int] = {}

    def of(self, key: bytes | None) -> int:
        if key is None:
            return NO_HOLDER
        index = self._index.get(key)
        if index is None:
            if len(self.keys) >= MAX_PEERS:
                raise ValueError("too many distinct holders in one node")
            index = self._index[key] = len(self.keys)
            self.keys.append(key)
        return index


def _enc_ref(ref: Ref, peers: _PeerTable) -> list:
    rec = ref.record
    holders = struct.pack(f">{rec.total}H", *(peers.of(h) for h in ref.holders))
    return [
        rec.block_id,
        rec.size,
        rec.shard_size,
        rec.needed,
        rec.wrapped_key,
        rec.nonce,
        b"".join(rec.shard_ids),
        holders,
    ]


def _int(value: object, what: str, lo: int = 0, hi: int = U64_MAX) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise NodeError(f"{what}: expected an integer in [{lo}, {hi}]")
    return value


def _bytes(value: object, what: str, lo: int = 0, hi: int = 1 << 24) -> bytes:
    if type(value) is not bytes or not lo <= len(value) <= hi:
        raise NodeError(f"{what}: expected {lo}..{hi} bytes")
    return value


def _list(value: object, what: str, hi: int = 1 << 20) -> list:
    if type(value) is not list or len(value) > hi:
        raise NodeError(f"{what}: expected a list")
    return value


def _dec_ref(raw: object, table: list[bytes]) -> Ref:
    raw = _list(raw, "ref", 8)
    if len(raw) != 8:
        raise NodeError("ref: expected 8 fields")
    block_id = _bytes(raw[0], "ref block id", ID_SIZE, ID_SIZE)
    size = _int(raw[1], "ref size", 0, 2**32 - 1)
    shard_size = _int(raw[2], "ref shard size", 1, 2**32 - 1)
    needed = _int(raw[3], "ref K", 1, MAX_SHARDS)
    wrapped = _bytes(raw[4], "ref wrapped key", WRAPPED_KEY_SIZE, WRAPPED_KEY_SIZE)
    nonce = _bytes(raw[5], "ref nonce", NONCE_SIZE, NONCE_SIZE)
    ids = _bytes(raw[6], "ref shard ids", ID_SIZE, ID_SIZE * MAX_SHARDS)
    total, rest = divmod(len(ids), ID_SIZE)
    if rest or total < needed:
        raise NodeError("ref: bad shard id list")
    holders_raw = _bytes(raw[7], "ref holders", 2 * total, 2 * total)
    holders = []
    for index in struct.unpack(f">{total}H", holders_raw):
        if index == NO_HOLDER:
            holders.append(None)
        elif index < len(table):
            holders.append(table[index])
        else:
            raise NodeError("ref: holder outside the peer table")
    record = BlockRecord(
        block_id,
        size,
        shard_size,
        needed,
        wrapped,
        nonce,
        tuple(ids[i * ID_SIZE : (i + 1) * ID_SIZE] for i in range(total)),
    )
    return Ref(record, tuple(holders))


# --- entries -------------------------------------------------------------------------


def _enc_entry(e: Entry, peers: _PeerTable) -> dict:
    out: dict = {"n": e.name}
    for key, value in (
        ("i", e.ino),
        ("m", e.mode),
        ("u", e.uid),
        ("g", e.gid),
        ("l", e.nlink),
        ("s", e.size),
        ("r", e.rdev),
        ("a", e.atime_ns),
        ("M", e.mtime_ns),
        ("c", e.ctime_ns),
        ("q", e.seq),
        ("w", e.when),
    ):
        if value:
            out[key] = value
    if e.target:
        out["t"] = e.target
    if e.xattrs:
        out["x"] = [[k, v] for k, v in e.xattrs]
    if e.blocks:
        out["b"] = [[i, _enc_ref(r, peers)] for i, r in e.blocks]
    if e.inline:
        out["I"] = [[i, d] for i, d in e.inline]
    if e.chunks:
        out["B"] = [[i, _enc_ref(r, peers)] for i, r in e.chunks]
    if e.content is not None:
        out["d"] = _enc_ref(e.content, peers)
    return out


_ENTRY_INTS = {
    "i": "ino",
    "m": "mode",
    "u": "uid",
    "g": "gid",
    "l": "nlink",
    "s": "size",
    "r": "rdev",
    "q": "seq",
    "w": "when",
}
_ENTRY_TIMES = {"a": "atime_ns", "M": "mtime_ns", "c": "ctime_ns"}
_ENTRY_KEYS = set(_ENTRY_INTS) | set(_ENTRY_TIMES) | {"n", "t", "x", "b", "I", "B", "d"}


def _dec_pairs_ref(raw: object, what: str, table: list[bytes]) -> list[tuple[int, Ref]]:
    out = []
    for item in _list(raw, what):
        item = _list(item, what, 2)
        if len(item) != 2:
            raise NodeError(f"{what}: expected [index, ref]")
        out.append((_int(item[0], what), _dec_ref(item[1], table)))
    return out


def _dec_entry(raw: object, table: list[bytes]) -> Entry:
    if type(raw) is not dict or not raw.keys() <= _ENTRY_KEYS:
        raise NodeError("entry: expected a map of known keys")
    entry = Entry(_bytes(raw.get("n"), "entry name", 0, 4096))
    for key, attr in _ENTRY_INTS.items():
        if key in raw:
            setattr(entry, attr, _int(raw[key], f"entry {attr}"))
    for key, attr in _ENTRY_TIMES.items():
        if key in raw:
            setattr(entry, attr, _int(raw[key], f"entry {attr}", -(2**63), 2**63 - 1))
    if "t" in raw:
        entry.target = _bytes(raw["t"], "entry target", 0, 65536)
    for item in _list(raw.get("x", []), "entry xattrs", 65536):
        item = _list(item, "xattr", 2)
        if len(item) != 2:
            raise NodeError("xattr: expected [name, value]")
        entry.xattrs.append((_bytes(item[0], "xattr name", 1, 255), _bytes(item[1], "xattr")))
    entry.blocks = _dec_pairs_ref(raw.get("b", []), "entry blocks", table)
    for item in _list(raw.get("I", []), "entry inline"):
        item = _list(item, "inline", 2)
        if len(item) != 2:
            raise NodeError("inline: expected [index, bytes]")
        entry.inline.append((_int(item[0], "inline index"), _bytes(item[1], "inline data")))
    entry.chunks = _dec_pairs_ref(raw.get("B", []), "entry chunks", table)
    if "d" in raw:
        entry.content = _dec_ref(raw["d"], table)
    return entry


# --- nodes ---------------------------------------------------------------------------


def _finish(node: dict, peers: _PeerTable) -> bytes:
    node["p"] = peers.keys
    return cbor2.dumps(node)


def encode_leaf(entries: list[Entry]) -> bytes:
    """A directory (or snapshot list) leaf node."""
    peers = _PeerTable()
    body = {"v": VERSION, "t": LEAF, "e": [_enc_entry(e, peers) for e in entries]}
    return _finish(body, peers)


def encode_index(children: list[tuple[bytes, Ref, int]], height: int) -> bytes:
    """An index node over *children* (first name, ref, entries below)."""
    peers = _PeerTable()
    body = {
        "v": VERSION,
        "t": INDEX,
        "h": height,
        "c": [[first, _enc_ref(ref, peers), count] for first, ref, count in children],
    }
    return _finish(body, peers)


def encode_manifest(blocks: list[tuple[int, Ref]], inline: list[tuple[int, bytes]]) -> bytes:
    """A manifest chunk of a large file."""
    peers = _PeerTable()
    body = {
        "v": VERSION,
        "t": MANIFEST,
        "b": [[i, _enc_ref(r, peers)] for i, r in blocks],
        "I": [[i, d] for i, d in inline],
    }
    return _finish(body, peers)


def encode_commit(info: CommitInfo) -> bytes:
    """A commit node."""
    peers = _PeerTable()
    body = {
        "v": VERSION,
        "t": COMMIT,
        "seq": info.seq,
        "time": info.time_ns,
        "machine": info.machine,
        "root": _enc_entry(info.root, peers),
        "nsnaps": info.nsnaps,
        "next_ino": info.next_ino,
        "bs": info.block_size,
    }
    if info.snaps is not None:
        body["snaps"] = _enc_ref(info.snaps, peers)
    return _finish(body, peers)


def decode_node(plain: bytes) -> TreeNode:
    """Parse any node; raise NodeError if it is not a well-formed version-1 node."""
    try:
        raw = envelope.loads(plain)
    except Exception as exc:
        raise NodeError(f"not CBOR: {str(exc)[:100]}") from None
    if type(raw) is not dict or raw.get("v") != VERSION:
        raise NodeError("not a version-1 metadata node")
    table = [_bytes(k, "peer key", KEY_SIZE, KEY_SIZE) for k in _list(raw.get("p"), "peers")]
    kind = raw.get("t")
    if kind == LEAF:
        entries = [_dec_entry(e, table) for e in _list(raw.get("e"), "entries")]
        return TreeNode(LEAF, entries=entries)
    if kind == INDEX:
        children = []
        for item in _list(raw.get("c"), "children"):
            item = _list(item, "child", 3)
            if len(item) != 3:
                raise NodeError("child: expected [first name, ref, count]")
            children.append(
                (
                    _bytes(item[0], "child first name", 0, 4096),
                    _dec_ref(item[1], table),
                    _int(item[2], "child count"),
                )
            )
        if not children:
            raise NodeError("index node without children")
        return TreeNode(INDEX, children=children, height=_int(raw.get("h"), "height", 1, 64))
    if kind == MANIFEST:
        blocks = _dec_pairs_ref(raw.get("b", []), "manifest blocks", table)
        inline = []
        for item in _list(raw.get("I", []), "manifest inline"):
            item = _list(item, "inline", 2)
            if len(item) != 2:
                raise NodeError("inline: expected [index, bytes]")
            inline.append((_int(item[0], "inline index"), _bytes(item[1], "inline data")))
        return TreeNode(MANIFEST, blocks=blocks, inline=inline)
    if kind == COMMIT:
        info = CommitInfo(
            seq=_int(raw.get("seq"), "seq"),
            time_ns=_int(raw.get("time"), "time"),
            machine=_bytes(raw.get("machine"), "machine", 1, 64),
            root=_dec_entry(raw.get("root"), table),
            snaps=_dec_ref(raw["snaps"], table) if "snaps" in raw else None,
            nsnaps=_int(raw.get("nsnaps"), "nsnaps"),
            next_ino=_int(raw.get("next_ino"), "next_ino", 2),
            block_size=_int(raw.get("bs"), "block size", 4096, 1 << 30),
        )
        return TreeNode(COMMIT, commit=info)
    raise NodeError(f"unknown node type {str(kind)[:16]!r}")


# --- chunking ------------------------------------------------------------------------


def cut_points(keys: list[bytes], sizes: list[int], chunk_key: bytes, level: int) -> list[int]:
    """Where to cut a sorted run of *keys* into nodes: the end index of each node.

    A node ends after an entry whose keyed hash (salted with the *level*), read as a
    fraction of 2^32, is below size / NODE_TARGET (so about every NODE_TARGET bytes),
    or once the node reaches NODE_SIZE_CAP bytes (sizes are estimates).
    """
    ends: list[int] = []
    total = 0
    salt = bytes([level])
    for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
        total += size
        digest = blake3.blake3(salt + key, key=chunk_key).digest(length=4)
        if int.from_bytes(digest, "big") * NODE_TARGET < size << 32 or total >= NODE_SIZE_CAP:
            ends.append(i + 1)
            total = 0
    if keys and (not ends or ends[-1] != len(keys)):
        ends.append(len(keys))
    return ends


def manifest_ranges(indexes: list[int]) -> list[tuple[int, int]]:
    """Split sorted block indexes into fixed chunks: (first index of the range, count)."""
    ranges: list[tuple[int, int]] = []
    for index in indexes:
        first = index - index % MANIFEST_CHUNK_BLOCKS
        if ranges and ranges[-1][0] == first:
            ranges[-1] = (first, ranges[-1][1] + 1)
        else:
            ranges.append((first, 1))
    return ranges
