"""LMDB shard store, plaintext cache and metadata tree."""

from __future__ import annotations

import os

from fluidfs.blocks.cache import BlockCache
from fluidfs.fs.tree import Tree
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.shards import ShardStore

OWNER_A, OWNER_B = b"a" * 32, b"b" * 32


def test_shard_store_accounts_per_owner_and_survives_reopen(tmp_path):
    store = ShardStore(tmp_path / "s")
    big = os.urandom(100_000)  # above cbor2's old 65 KiB trouble spot, and many LMDB pages
    assert store.put_many(OWNER_A, [(b"1" * 32, big), (b"2" * 32, b"xy")]) == 100_002
    store.put_many(OWNER_B, [(b"1" * 32, b"other owner")])
    assert store.used(OWNER_A) == 100_002
    assert store.get(OWNER_A, b"1" * 32) == big
    assert store.get(OWNER_B, b"1" * 32) == b"other owner"
    assert store.get(OWNER_B, b"2" * 32) is None
    store.close()
    store = ShardStore(tmp_path / "s")
    assert sorted(store.ids(OWNER_A)) == [b"1" * 32, b"2" * 32]
    assert store.delete_many(OWNER_A, [b"1" * 32, b"9" * 32]) == 100_000
    assert store.used(OWNER_A) == 2
    assert store.owners() == {OWNER_A: 2, OWNER_B: 11}


def test_cache_evicts_least_recently_used_but_never_pinned(tmp_path):
    pinned = {b"p" * 32}
    cache = BlockCache(tmp_path / "c", capacity=250, can_evict=lambda b: b not in pinned)
    for bid in (b"p" * 32, b"a" * 32, b"b" * 32):
        cache.insert_io(bid, b"x" * 100)
        cache.note(bid, 100)
    cache.touch(b"a" * 32)
    victims = cache.victims()
    assert victims == [b"b" * 32]
    cache.remove_io(victims)
    assert cache.read_io(b"b" * 32, 0, 10) is None
    assert cache.read_io(b"p" * 32, 10, 5) == b"xxxxx"
    rescanned = BlockCache(tmp_path / "c", capacity=250, can_evict=lambda b: True)
    rescanned.load(rescanned.scan_io())
    assert len(rescanned) == 2 and rescanned.used == 200


def test_directory_listing_is_stable_while_entries_change(tmp_path):
    db = Database(tmp_path / "m", META_TABLES)
    tree = Tree(db)
    with db.write() as txn:
        for i in range(100):
            tree.link(txn, 1, b"f%03d" % i, 1000 + i)
    seen: list[bytes] = []
    after = 0
    batch = 0
    while True:
        page = []
        for cookie, name, _child in tree.entries(1, after):
            page.append((cookie, name))
            if len(page) == 7:
                break
        if not page:
            break
        seen += [name for _, name in page]
        after = page[-1][0]
        with db.write() as txn:  # churn between pages: add, remove and rename others
            tree.link(txn, 1, b"new%03d" % batch, 5000 + batch)
            tree.unlink(txn, 1, b"new%03d" % batch)
            batch += 1
    assert len(seen) == len(set(seen))
    assert {b"f%03d" % i for i in range(100)} <= set(seen)


def test_block_map_cut(tmp_path):
    db = Database(tmp_path / "m", META_TABLES)
    tree = Tree(db)
    with db.write() as txn:
        for i in range(5):
            tree.set_block(txn, 7, i, b"I" + bytes([i]))
        tree.set_block(txn, 8, 0, b"Ix")
    with db.write() as txn:
        cut = tree.cut_blocks(txn, 7, 2)
    assert cut == [b"I\x02", b"I\x03", b"I\x04"]
    assert [i for i, _ in tree.blocks_of(7)] == [0, 1]
    assert tree.blocks_of(8) == [(0, b"Ix")]


def test_shard_pages_are_released_only_after_shard_traffic(tmp_path):
    store = ShardStore(tmp_path / "s")
    store.put_many(OWNER_A, [(b"1" * 32, os.urandom(1 << 20))])
    assert store.release_pages() > 0, "the write touched the mapping"
    assert store.release_pages() == 0, "nothing since: nothing to do"
    assert store.used(OWNER_A) == 1 << 20 and store.release_pages() == 0, "no shard read"
    assert len(store.get(OWNER_A, b"1" * 32)) == 1 << 20
    assert store.release_pages() > 0
    # The mapping's range is looked up once and kept; releasing still gives back the
    # pages that reading left in this process's RSS.
    shards = [(bytes([i]) * 32, os.urandom(1 << 20)) for i in range(2, 34)]
    store.put_many(OWNER_A, shards)
    store.release_pages()
    before = rss_file()
    for shard_id, data in shards:
        assert store.get(OWNER_A, shard_id) == data
    assert rss_file() - before > 16 << 20, "the reads mapped the shards' pages"
    store.release_pages()
    assert rss_file() - before < 4 << 20, "and releasing gave them back"
    store.close()


def rss_file() -> int:
    """Bytes of file-backed pages mapped in this process (RssFile in /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")
