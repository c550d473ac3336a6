"""Metadata node format v1 (fs/metaformat.py) and snapshot retention (fs/snapshots.py)."""

from __future__ import annotations

import os
import random
import stat
import sys

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluidfs.blocks.codec import AEGIS, CAUCHY, XCHACHA, BlockCodec
from fluidfs.fs.inode import FIELDS, Inode
from fluidfs.fs.metaformat import (
    MANIFEST_CHUNK_BLOCKS,
    NODE_SIZE_CAP,
    NODE_TARGET,
    CommitInfo,
    Entry,
    NodeError,
    Ref,
    _entry_schema,
    _ref_schema,
    cut_points,
    decode_node,
    encode_commit,
    encode_index,
    encode_leaf,
    encode_manifest,
    manifest_ranges,
)
from fluidfs.fs.snapshots import Retention, snapshot_name
from fluidfs.wire.schema import Map, SchemaError

NS = 1_000_000_000
HOUR = 3600 * NS
DAY = 24 * HOUR
PEERS = [os.urandom(32) for _ in range(14)]


def make_ref(data: bytes = b"", holders=None) -> Ref:
    codec = BlockCodec(dedup_key=bytes(32), wrap_key=bytes(32), needed=8, total=12)
    record, _ = codec.seal(data or os.urandom(100))
    if holders is None:
        holders = tuple(PEERS[i] for i in range(12))
    return Ref(record, tuple(holders))


def test_leaf_round_trip_keeps_every_field() -> None:
    holders = (PEERS[0], None, *PEERS[1:11])
    file_entry = Entry(
        b"caf\xc3\xa9 \xff.bin",
        ino=42,
        mode=stat.S_IFREG | 0o640,
        uid=1000,
        gid=100,
        nlink=2,
        size=5 * 4096,
        atime_ns=-5,
        mtime_ns=1_700_000_000_123_456_789,
        ctime_ns=1,
        xattrs=[(b"user.a", b""), (b"user.b", os.urandom(300))],
        blocks=[(0, make_ref(holders=holders)), (3, make_ref())],
        inline=[(7, b"tail")],
    )
    dir_entry = Entry(b"d", ino=7, mode=stat.S_IFDIR | 0o755, nlink=3, content=make_ref())
    link = Entry(b"l", ino=8, mode=stat.S_IFLNK | 0o777, size=3, target=b"../x")
    dev = Entry(b"n", ino=9, mode=stat.S_IFCHR | 0o600, rdev=0x0501)
    big = Entry(b"z", ino=10, mode=stat.S_IFREG, chunks=[(0, make_ref()), (512, make_ref())])
    entries = [file_entry, dir_entry, link, dev, big]
    node = decode_node(encode_leaf(entries))
    assert node.type == "d"
    assert node.entries == entries
    assert node.entries[0].blocks[0][1].holders[1] is None
    kinds = [(ref.block_id, is_node) for ref, is_node in node.refs()]
    assert len(kinds) == 5 and sum(is_node for _, is_node in kinds) == 3


def test_peer_table_names_each_holder_once() -> None:
    refs = [make_ref() for _ in range(20)]
    raw = cbor2.loads(encode_leaf([Entry(b"f", blocks=list(enumerate(refs)))]))
    assert len(raw["p"]) == 12  # 20 refs, the same 12 holders


def test_other_node_types_round_trip() -> None:
    children = [(b"a", make_ref(), 10), (b"m", make_ref(), 7)]
    node = decode_node(encode_index(children, 2))
    assert node.type == "i" and node.height == 2 and node.children == children

    blocks = [(i, make_ref()) for i in range(3)]
    node = decode_node(encode_manifest(blocks, [(5, b"x")]))
    assert node.type == "f" and node.blocks == blocks and node.inline == [(5, b"x")]

    root = Entry(b"", ino=1, mode=stat.S_IFDIR | 0o755, nlink=2, content=make_ref())
    info = CommitInfo(9, 123, os.urandom(16), root, make_ref(), 3, 4711, 4 << 20)
    node = decode_node(encode_commit(info))
    assert node.type == "c" and node.commit == info
    assert {ref.block_id for ref, _ in node.refs()} == {root.content.block_id, info.snaps.block_id}
    info.snaps = None
    assert decode_node(encode_commit(info)).commit.snaps is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda raw: raw | {"v": 2},
        lambda raw: raw | {"t": "q"},
        lambda raw: raw | {"p": [b"short"]},
        lambda raw: raw | {"e": "not a list"},
        lambda raw: raw | {"e": [{"n": b"x", "zz": 1}]},
        lambda raw: raw | {"e": [{"n": b"x", "i": -1}]},
        lambda raw: raw | {"e": [{"n": b"x", "m": True}]},
        lambda raw: _mangle_ref(raw, 6, b"\x00" * 33),  # shard ids not a multiple of 32
        lambda raw: _mangle_ref(raw, 7, b"\x00\x63" * 12),  # holder outside the table
        lambda raw: _mangle_ref(raw, 0, b"\x00" * 31),  # short block id
        lambda raw: _mangle_ref(raw, 3, 0),  # K = 0
        lambda raw: _mangle_ref(raw, 5, b"\x00" * 28),  # a nonce of no sealed layout
        lambda raw: _mangle_ref(raw, 5, b"\x00" * 33),
        lambda raw: _code_ref(raw, [2]),  # an erasure code of no sealed layout
        lambda raw: _code_ref(raw, [0]),  # zfec is written by leaving the code out
        lambda raw: _code_ref(raw, [1, 1]),
        lambda raw: _code_ref(raw, ["1"]),
        lambda raw: _mangle_ref(_code_ref(raw, [1]), 5, b"\x00" * 24),  # XChaCha + ISA-L
    ],
)
def test_malformed_nodes_are_refused(mangle) -> None:
    raw = cbor2.loads(encode_leaf([Entry(b"f", blocks=[(0, make_ref())])]))
    with pytest.raises(NodeError):
        decode_node(cbor2.dumps(mangle(raw)))


@pytest.mark.parametrize("version", [XCHACHA, AEGIS, CAUCHY])
def test_refs_keep_their_sealed_layout(version: int) -> None:
    """A fresh machine reads a block's layout from its reference: both open."""
    codec = BlockCodec(dedup_key=bytes(32), wrap_key=bytes(32), needed=8, total=12,
                       version=version)
    data = os.urandom(5000)
    record, shards = codec.seal(data)
    ref = Ref(record, tuple(PEERS[:12]))
    (entry,) = decode_node(encode_leaf([Entry(b"f", blocks=[(0, ref)])])).entries
    back = entry.blocks[0][1]
    assert back == ref
    assert len(back.record.nonce) == {XCHACHA: 24, AEGIS: 32, CAUCHY: 32}[version]
    assert codec.open(back.record, {i: shards[i] for i in range(4, 12)}) == data
    # a zfec block's reference stays as it was before layout 4: 8 items
    raw = cbor2.loads(encode_leaf([Entry(b"f", blocks=[(0, ref)])]))
    assert len(raw["e"][0]["b"][0][1]) == {XCHACHA: 8, AEGIS: 8, CAUCHY: 9}[version]


def _code_ref(raw: dict, code: list) -> dict:
    ref = raw["e"][0]["b"][0][1]
    raw["e"][0]["b"][0][1] = ref[:8] + code
    return raw


def _mangle_ref(raw: dict, field: int, value) -> dict:
    raw["e"][0]["b"][0][1][field] = value
    return raw


@pytest.mark.parametrize("junk", [b"", b"\xff" * 10, os.urandom(200), cbor2.dumps([1, 2])])
def test_junk_is_refused(junk: bytes) -> None:
    with pytest.raises(NodeError):
        decode_node(junk)


def test_cut_points_move_little_when_one_entry_is_added() -> None:
    key = os.urandom(32)
    rng = random.Random(3)
    names = sorted({f"file{rng.randrange(10**9):09d}".encode() for _ in range(3000)})
    sizes = [600] * len(names)

    def chunks(keys: list[bytes]) -> set[tuple[bytes, ...]]:
        ends = cut_points(keys, [600] * len(keys), key, 0)
        out, start = set(), 0
        for end in ends:
            out.add(tuple(keys[start:end]))
            start = end
        return out

    before = chunks(names)
    average = len(names) / len(before)
    assert NODE_TARGET / 600 / 2 < average < NODE_TARGET / 600 * 2
    after = chunks(sorted([*names, b"file5000000000x"]))
    assert len(after - before) <= 2, "an insert rewrites at most two leaves"
    assert cut_points([], [], key, 0) == []
    ends = cut_points(names[:50], [NODE_SIZE_CAP] * 50, key, 1)
    assert ends == list(range(1, 51)), "oversized entries each end their node"
    assert sizes  # the list above is what the estimate looks like for ~600-byte entries


def test_manifest_ranges_are_fixed_by_index() -> None:
    indexes = [0, 1, 511, 512, 1500, 1501]
    assert manifest_ranges(indexes) == [(0, 3), (512, 1), (1024, 2)]
    assert MANIFEST_CHUNK_BLOCKS == 512


# --- retention --------------------------------------------------------------------------


def test_retention_parse_and_print() -> None:
    assert Retention.parse("all=1d,hourly=7d,daily=90d") == Retention()
    assert str(Retention()) == "all=1d,hourly=1w,daily=90d"
    policy = Retention.parse("hourly=36h, monthly=1y")
    assert (policy.all, policy.hourly, policy.monthly) == (0, 36 * 3600, 365 * 86400)
    for bad in ("weekly", "yearly=1d", "daily=soon", "all=-1d"):
        with pytest.raises(ValueError):
            Retention.parse(bad)


def test_default_retention_thins_out_with_age() -> None:
    now = 1_800_000_000 * NS
    times = [now - i * 10 * 60 * NS for i in range(24 * 6 * 100)]  # every 10 min, 100 days
    snaps = [(seq, t) for seq, t in enumerate(reversed(times))]
    kept = Retention().keep(snaps, now)
    ages = sorted((now - t) / DAY for seq, t in snaps if seq in kept)
    recent = [a for a in ages if a <= 1]
    assert len(recent) == 24 * 6 + 1  # every commit of the last day
    week = [a for a in ages if 1 < a <= 7]
    assert 6 * 24 - 2 <= len(week) <= 6 * 24 + 1  # about one per hour
    older = [a for a in ages if 7 < a <= 90]
    assert 82 <= len(older) <= 84  # about one per day
    assert not [a for a in ages if a > 90.01]
    assert kept[len(snaps) - 1] == "newest"


def test_retention_keeps_the_newest_even_when_everything_is_old() -> None:
    now = 1_800_000_000 * NS
    snaps = [(1, now - 400 * DAY), (2, now - 300 * DAY)]
    assert Retention().keep(snaps, now) == {2: "newest"}
    assert Retention.parse("all=0s").keep(snaps, now) == {2: "newest"}
    assert Retention().keep([], now) == {}


def test_snapshot_names_sort_by_time() -> None:
    times = sorted(random.Random(1).randrange(1_600_000_000, 1_900_000_000) for _ in range(50))
    names = [snapshot_name(t * NS) for t in times]
    assert names == sorted(names)
    assert snapshot_name(1_700_000_000 * NS) == "2023-11-14T22:13:20Z"


def test_inode_fields_survive_the_record_and_a_metadata_entry() -> None:
    """Every Inode field (the one definition) reaches the record and an entry and back."""
    values = {name: 1000 + i for i, name in enumerate(FIELDS)}
    inode = Inode(**{**values, "atime_ns": -5, "target": b"../t"})
    assert Inode.decode(inode.ino, inode.encode()) == inode
    entry = Entry.of_inode(b"n", inode)
    (back,) = decode_node(encode_leaf([entry])).entries
    assert back.inode() == inode and back.inode(7) == Inode(**{**vars_of(inode), "ino": 7})


def vars_of(inode: Inode) -> dict:
    return {name: getattr(inode, name) for name in FIELDS}


def _entry_values():
    """Entry maps as a node may carry them: well-formed, at the bounds, and just past."""
    numbers = st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -(2**63),
                               -(2**63) - 1, True, 1.5, b"1"])
    data = st.one_of(st.binary(max_size=8), st.sampled_from([b"x" * 4096, b"x" * 4097]),
                     st.integers(0, 3), st.text(max_size=2))
    inline = st.one_of(
        st.lists(st.one_of(st.tuples(numbers, data).map(list), st.lists(numbers, max_size=3),
                           numbers), max_size=3),
        data,
    )
    keys = st.sampled_from(["n", "i", "m", "u", "g", "l", "s", "r", "a", "M", "c", "q", "w",
                            "t", "I", "x", "zz", 1, b"n"])
    values = st.one_of(numbers, data, inline)
    return st.dictionaries(keys, values, max_size=8).map(
        lambda m: m if "n" in m or len(m) % 2 else {"n": b"name", **m})


@settings(max_examples=500, deadline=None)
@given(_entry_values())
def test_the_entry_fast_path_takes_what_the_schema_takes(value) -> None:
    """The entry schema's fast path (``_EntryMap``) accepts exactly the entries the
    general schema walk accepts, builds the same Entry, and refuses with its words."""
    schema = _entry_schema(_ref_schema([]))
    try:
        expected = Map.parse(schema, value)
    except SchemaError as exc:
        with pytest.raises(SchemaError) as refused:
            schema.parse(value)
        assert str(refused.value) == str(exc)
    else:
        assert schema.parse(value) == expected


def test_a_leaf_of_plain_entries_decodes_without_a_schema_call_per_field() -> None:
    """A fresh machine decodes every entry of the tree: a leaf of small inline files
    (numbers, a name, inline data) is checked by the entry's fast path, not by one
    ``Schema.parse`` call per field (15 an entry before)."""
    now = 1_700_000_000 * NS
    entries = [Entry(f"f{i:05d}".encode(), ino=100 + i, mode=stat.S_IFREG | 0o644, uid=1000,
                     gid=1000, nlink=1, size=200, atime_ns=now, mtime_ns=now, ctime_ns=now,
                     inline=[(0, os.urandom(200))]) for i in range(100)]
    raw = encode_leaf(entries)
    calls = 0

    def count(frame, event, _arg) -> None:
        nonlocal calls
        if event == "call" and frame.f_code.co_name == "parse" and frame.f_code.co_filename \
                .endswith(os.path.join("wire", "schema.py")):
            calls += 1

    sys.setprofile(count)
    try:
        node = decode_node(raw)
    finally:
        sys.setprofile(None)
    assert node.entries == entries
    assert calls <= 20, f"{calls} schema parse calls for a leaf of 100 plain entries"
