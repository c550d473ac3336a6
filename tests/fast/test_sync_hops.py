"""Worker-thread hops of a first sync (issue 15): each hop costs the event loop more than
hashing a metadata node, and a first sync of 1,000,000 files writes ~25,000 nodes.
A new block is sealed and written to the cache in one hop; a small node is hashed on
the loop; a directory slice is cut into leaves and they are encoded in one hop. The
hops are counted through ``trio.to_thread.run_sync`` itself (the real function runs
every job)."""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from inproc import LocalStore, Metadata

from fluidfs import keys

RING = keys.KeyRing(keys.generate())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "state", RING)
    yield s
    s.close()


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Jobs handed to worker threads, by function name (each still runs for real)."""
    counted: Counter[str] = Counter()
    run_sync = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        counted[getattr(fn, "__qualname__", type(fn).__name__)] += 1
        return await run_sync(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    return counted


async def test_a_new_block_is_sealed_and_cached_in_one_hop(
    store: LocalStore, hops: Counter[str]
) -> None:
    """Before: sealing took one hop and the cache write another."""
    data = os.urandom(20_000)
    block_id = await store.blocks.put(data)
    assert sum(hops.values()) == 1, hops
    assert block_id in store.cache
    assert store.cache.path(block_id).read_bytes() == data
    assert store.refcount(block_id) == 1


async def test_a_commit_hops_about_twice_per_node(
    store: LocalStore, hops: Counter[str]
) -> None:
    """A commit of 30 directories: per directory slice, one hop cuts it and encodes its
    leaves; per node, one seals it (with its cache copy); plus a dozen reads and writes
    of the tree and its tables. Before: also a hop to encode each leaf, one to hash each
    node and one to write its cache copy (174 hops for 33 nodes)."""
    meta = Metadata(store)
    for d in range(30):
        ino = store.mkdir(1, f"d{d:03d}")
        for i in range(20):
            store.new_inode(ino, f"f{i:03d}", stat.S_IFREG | 0o644)
    hops.clear()
    result = await meta.commit()
    nodes = result.stats.nodes_written
    assert nodes >= 30
    assert sum(hops.values()) <= 2 * nodes + 20, (nodes, hops)
