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

    [block id (32), size, shard size, K, wrapped key (72), nonce (24 or 32),
     shard ids (N x 32 bytes, concatenated), holders (N x u16 big-endian: index into
     "p", 0xFFFF = no holder), erasure code (only when not 0)]

which is everything a machine holding only the keyfile needs to fetch, check and
decrypt the block (see blocks/codec.py). The nonce's length and the erasure code name
the block's sealed layout: a 24-byte nonce is XChaCha20-Poly1305 (layouts 1 and 2), a
32-byte one AEGIS-256 (layout 3, or layout 4 with erasure code 1, ISA-L Cauchy
Reed-Solomon; blocks/erasure.py). A reference without the code is zfec (code 0), as
every reference before layout 4. Both were added without a new node version: a reader
that predates them refuses such a reference as malformed rather than misreading it.

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

Decoding checks every node against the schemas below (fluidfs.wire): a missing or
mistyped field is an error; unknown keys are refused inside entries and references
and ignored at a node's top level (a later version may add node fields). Nodes are
authenticated (keyed hash and AEAD) before they are decoded, so the bound is the
node's size, without the item prescan untrusted network frames get.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from functools import partial
from operator import attrgetter
from typing import Any

import blake3
import cbor2

from fluidfs.blocks.codec import (
    KEY_SIZE,
    NONCE_SIZES,
    WRAPPED_KEY_SIZE,
    BlockRecord,
    CorruptBlock,
    sealed_version,
)
from fluidfs.blocks.erasure import RS_CAUCHY, ZFEC
from fluidfs.fs.inode import FIELDS as INODE_FIELDS
from fluidfs.fs.inode import Inode
from fluidfs.wire import (
    IGNORE,
    Bound,
    Bytes,
    Int,
    List,
    Map,
    OneOf,
    Schema,
    SchemaError,
    Tuple,
    cbor,
)

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
MAX_NODE = 64 * 1024 * 1024  # bytes of one decoded node (a block: far above NODE_SIZE_CAP)


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
        inode = Inode(*_inode_attrs(self))
        if ino is not None:
            inode.ino = ino
        return inode

    @classmethod
    def of_inode(cls, name: bytes, inode: Inode) -> Entry:
        """An entry carrying *inode*'s attributes (no data yet)."""
        return cls(name, *_inode_attrs(inode))

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


# An entry's fields after its name are an Inode's, in the same order (fs/inode.py).
_inode_attrs = attrgetter(*INODE_FIELDS)
if tuple(f.name for f in fields(Entry))[1 : 1 + len(INODE_FIELDS)] != INODE_FIELDS:
    raise AssertionError("Entry's attributes no longer follow Inode's fields")


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
        *([] if rec.code == ZFEC else [rec.code]),
    ]


ID = Bytes(ID_SIZE, ID_SIZE)
U64 = Int(0, U64_MAX)
TIME_NS = Int(-(2**63), 2**63 - 1)
NAME = Bytes(0, 4096)
DATA = Bytes(0, 1 << 24)
MANY = 1 << 20  # items of one list in a node


def _ref(
    table: list[bytes],
    block_id: bytes,
    size: int,
    shard_size: int,
    needed: int,
    wrapped: bytes,
    nonce: bytes,
    ids: bytes,
    holders_raw: bytes,
    code: int = ZFEC,
) -> Ref:
    """A reference from its checked parts; ``table`` is the node's peer table."""
    total, rest = divmod(len(ids), ID_SIZE)
    if rest or total < needed:
        raise SchemaError("", "bad shard id list")
    if len(nonce) not in NONCE_SIZES:
        raise SchemaError("", "nonce of no sealed layout")
    if len(holders_raw) != 2 * total:
        raise SchemaError("", f"expected {2 * total} bytes of holders")
    holders = []
    for index in struct.unpack(f">{total}H", holders_raw):
        if index == NO_HOLDER:
            holders.append(None)
        elif index < len(table):
            holders.append(table[index])
        else:
            raise SchemaError("", "holder outside the peer table")
    record = BlockRecord(
        block_id,
        size,
        shard_size,
        needed,
        wrapped,
        nonce,
        tuple(ids[i * ID_SIZE : (i + 1) * ID_SIZE] for i in range(total)),
        code,
    )
    try:
        sealed_version(record)
    except CorruptBlock:
        raise SchemaError("", "nonce and erasure code of no sealed layout") from None
    return Ref(record, tuple(holders))


def _ref_schema(table: list[bytes]) -> Schema:
    """A reference, resolving its holders in ``table``."""
    return Tuple(
        ID,
        Int(0, 2**32 - 1),  # size
        Int(1, 2**32 - 1),  # shard size
        Int(1, MAX_SHARDS),  # K
        Bytes(WRAPPED_KEY_SIZE, WRAPPED_KEY_SIZE),
        Bytes(min(NONCE_SIZES), max(NONCE_SIZES)),
        Bytes(ID_SIZE, ID_SIZE * MAX_SHARDS),  # shard ids
        Bytes(0, 2 * MAX_SHARDS),  # holders
        OneOf(RS_CAUCHY),  # erasure code, left out for zfec
        into=partial(_ref, table),
        optional=1,
    )


# --- entries -------------------------------------------------------------------------


# An entry's keys (the format above) and the Entry attribute each one carries. Numbers
# and the target are left out when they have their default (0, empty).
_ENTRY_NUMBERS = {
    "i": "ino",
    "m": "mode",
    "u": "uid",
    "g": "gid",
    "l": "nlink",
    "s": "size",
    "r": "rdev",
    "a": "atime_ns",
    "M": "mtime_ns",
    "c": "ctime_ns",
    "q": "seq",
    "w": "when",
}
_ENTRY_ATTRS = {
    "n": "name",
    **_ENTRY_NUMBERS,
    "t": "target",
    "x": "xattrs",
    "b": "blocks",
    "I": "inline",
    "B": "chunks",
    "d": "content",
}
_numbers = attrgetter(*_ENTRY_NUMBERS.values())


def _enc_entry(e: Entry, peers: _PeerTable) -> dict:
    out: dict = {"n": e.name}
    for key, value in zip(_ENTRY_NUMBERS, _numbers(e), strict=True):
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


def _entry(parts: dict) -> Entry:
    return Entry(**{_ENTRY_ATTRS[key]: value for key, value in parts.items()})


# An entry number's attribute and bounds, for ``_EntryMap``'s fast path (the same
# bounds as the schema's U64 and TIME_NS).
_FAST_NUMBERS = {
    key: (attr, TIME_NS.min, TIME_NS.max) if attr.endswith("_ns") else (attr, U64.min, U64.max)
    for key, attr in _ENTRY_NUMBERS.items()
}


class _EntryMap(Map):
    """The entry schema, with a fast path for an entry of numbers, a name, a symlink
    target and inline data (all but a directory's few subdirectories and large files).

    A fresh machine's walk decodes every entry of the tree, and the general walk (a
    ``parse`` call per field, then the entry built from a dict) cost ~3.5x cbor2's own
    decoding of the node. The fast path checks the same types and bounds inline; any
    other key (references, xattrs) or any value that does not fit sends the whole entry
    the general way, which accepts exactly the same entries and words the errors."""

    def parse(self, value: Any) -> Any:
        """The entry (see the class)."""
        if type(value) is not dict or "n" not in value:
            return super().parse(value)
        fields: dict[str, Any] = {}
        for key, v in value.items():
            number = _FAST_NUMBERS.get(key) if type(key) is str else None
            if number is not None:
                attr, low, high = number
                if type(v) is not int or not low <= v <= high:
                    return super().parse(value)
                fields[attr] = v
            elif key == "n" and type(v) is bytes and NAME.min <= len(v) <= NAME.max:
                fields["name"] = v
            elif key == "t" and type(v) is bytes and _TARGET.min <= len(v) <= _TARGET.max:
                fields["target"] = v
            elif key == "I" and type(v) is list and len(v) <= MANY:
                inline = []
                for item in v:
                    if type(item) is not list or len(item) != 2:
                        return super().parse(value)
                    index, data = item
                    if (type(index) is not int or not U64.min <= index <= U64.max
                            or type(data) is not bytes or not DATA.min <= len(data) <= DATA.max):
                        return super().parse(value)
                    inline.append((index, data))
                fields["inline"] = inline
            else:
                return super().parse(value)
        return Entry(**fields)


_TARGET = Bytes(0, 65536)


def _entry_schema(ref: Schema) -> Schema:
    """A directory or snapshot-list entry whose references are ``ref``."""
    numbers = {
        key: TIME_NS if attr.endswith("_ns") else U64 for key, attr in _ENTRY_NUMBERS.items()
    }
    return _EntryMap(
        {"n": NAME},
        {
            **numbers,
            "t": _TARGET,
            "x": List(Tuple(Bytes(1, 255), DATA), 65536),
            "b": List(Tuple(U64, ref), MANY),
            "I": List(Tuple(U64, DATA), MANY),
            "B": List(Tuple(U64, ref), MANY),
            "d": ref,
        },
        into=_entry,
    )


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


_HEAD = Map(
    {
        "v": OneOf(VERSION),
        "t": OneOf(LEAF, INDEX, MANIFEST, COMMIT),
        "p": List(Bytes(KEY_SIZE, KEY_SIZE), MANY),
    },
    extra=IGNORE,
)


class _NodeSchema(Schema):
    """Any node: the head (version, type, peer table) decides the rest's schema."""

    def parse(self, value: object) -> TreeNode:
        head = _HEAD.parse(value)
        return _node_schema(head["t"], head["p"]).parse(value)

    def bound(self) -> Bound:
        return Bound(MAX_NODE, MAX_NODE)


NODE = _NodeSchema()


def _node_schema(kind: str, table: list[bytes]) -> Schema:
    """The schema of a node of type ``kind`` whose peer table is ``table``."""
    ref = _ref_schema(table)
    pairs = List(Tuple(U64, ref), MANY)
    inline = List(Tuple(U64, DATA), MANY)
    if kind == LEAF:
        return Map(
            {"e": List(_entry_schema(ref), MANY)},
            extra=IGNORE,
            into=lambda m: TreeNode(LEAF, entries=m["e"]),
        )
    if kind == INDEX:
        return Map(
            {"h": Int(1, 64), "c": List(Tuple(NAME, ref, U64, into=_child), MANY, min_len=1)},
            extra=IGNORE,
            into=lambda m: TreeNode(INDEX, children=m["c"], height=m["h"]),
        )
    if kind == MANIFEST:
        return Map(
            {},
            {"b": pairs, "I": inline},
            extra=IGNORE,
            into=lambda m: TreeNode(MANIFEST, blocks=m.get("b", []), inline=m.get("I", [])),
        )
    return Map(
        {
            "seq": U64,
            "time": U64,
            "machine": Bytes(1, 64),
            "root": _entry_schema(ref),
            "nsnaps": U64,
            "next_ino": Int(2, U64_MAX),
            "bs": Int(4096, 1 << 30),
        },
        {"snaps": ref},
        extra=IGNORE,
        into=_commit,
    )


def _child(first: bytes, ref: Ref, count: int) -> tuple[bytes, Ref, int]:
    return first, ref, count


def _commit(m: dict) -> TreeNode:
    info = CommitInfo(
        seq=m["seq"],
        time_ns=m["time"],
        machine=m["machine"],
        root=m["root"],
        snaps=m.get("snaps"),
        nsnaps=m["nsnaps"],
        next_ino=m["next_ino"],
        block_size=m["bs"],
    )
    return TreeNode(COMMIT, commit=info)


def decode_node(plain: bytes) -> TreeNode:
    """Parse any node; raise NodeError if it is not a well-formed version-1 node."""
    try:
        return cbor.decode(NODE, plain, max_size=MAX_NODE)
    except SchemaError as exc:
        raise NodeError(f"not a well-formed version-1 metadata node: {exc}") from None


# --- chunking ------------------------------------------------------------------------


def cut_points(keys: list[bytes], sizes: list[int], chunk_key: bytes, level: int) -> list[int]:
    """Where to cut a sorted run of *keys* into nodes: the end index of each node.

    A node ends after an entry whose keyed hash (salted with the *level*), read as a
    fraction of 2^32, is below size / NODE_TARGET (so about every NODE_TARGET bytes),
    or once the node reaches NODE_SIZE_CAP bytes (sizes are estimates).
    """
    return open_cut_points(keys, sizes, chunk_key, level)[0]


def open_cut_points(
    keys: list[bytes], sizes: list[int], chunk_key: bytes, level: int
) -> tuple[list[int], bool]:
    """``cut_points``, and whether the last node ends at a cut of its own (True) or only
    because the run ends there (False: with more keys after the run it could go on).
    A cut depends only on the entries since the cut before it, so cutting may start
    afresh at any cut and give the same nodes as cutting the whole run."""
    ends: list[int] = []
    total = 0
    salt = bytes([level])
    for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
        total += size
        digest = blake3.blake3(salt + key, key=chunk_key).digest(length=4)
        if int.from_bytes(digest, "big") * NODE_TARGET < size << 32 or total >= NODE_SIZE_CAP:
            ends.append(i + 1)
            total = 0
    closed = bool(ends) and ends[-1] == len(keys)
    if keys and not closed:
        ends.append(len(keys))
    return ends, closed


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
