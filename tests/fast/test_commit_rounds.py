"""How many placements one after another a commit waits for (issue 16): a commit's nodes
wait for their holders before the node above can name them, so every level of a
directory's tree costs a round trip to the peers; nodes that do not name each other
must not cost one each.

The owner stores through real peer services on 127.0.0.1, on virtual time, with 50 ms
added to every request, so that what overlaps cannot pass for sequential.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
from inproc import Metadata, slow_jump_clock
from networked import storing_through
from test_mount_gate import rounds

from fluidfs import keys
from fluidfs.fs.commit import wait_placed
from fluidfs.fs.metaformat import decode_node

RING = keys.KeyRing(keys.generate(shards_total=4, shards_needed=2))
LEAVES = 600  # leaves under one directory: about 11 index nodes above them, then 1
DELAY = 0.05
FILES = 300  # small files inline in their directory's leaves: ~40 of them


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Time that jumps only when this process is idle (every honest answer is in)."""
    return slow_jump_clock()


async def test_the_index_nodes_of_one_level_are_placed_together(
    tmp_path: Path, monkeypatch, virtual_clock
) -> None:
    """A big directory's index nodes over its leaves were stored one after another,
    each waiting for its placement before the next began: 12 rounds here (a directory of
    10,000 small files waited ~25 in a row, 1,000 of them 3 of the 12 its commit took).
    Now those of one level are stored at once: a round a level."""
    async with storing_through(tmp_path, 4, RING) as (store, owner, _hosts):
        meta = Metadata(store)
        async with trio.open_nursery() as tasks:
            await tasks.start(store.blocks.remote.run)
            await tasks.start(store.blocks.run)
            block_id = await store.blocks.put(os.urandom(3000))
            assert await wait_placed(store.blocks, [block_id], stall=30, limit=60)
            leaf = meta.holders.ref(store.blocks.load(block_id))
            items = [(f"name{i:05d}".encode(), leaf, 7) for i in range(LEAVES)]

            calls: list[tuple[float, float]] = []
            call = owner.conns.call

            async def slow_call(*args, **kwargs):
                started = trio.current_time()
                await trio.sleep(DELAY)
                try:
                    return await call(*args, **kwargs)
                finally:
                    if args[1] == "StoreShard":
                        calls.append((started, trio.current_time()))

            monkeypatch.setattr(owner.conns, "call", slow_call)
            writer = meta.committer.writer()
            top = await writer._index(items)
            monkeypatch.undo()

            root = decode_node(bytes(await store.blocks.read(top.block_id, 0, 1 << 20)))
            assert root.height == 2 and sum(c for _, _, c in root.children) == 7 * LEAVES
            assert len(root.children) >= 5, "several index nodes on the level below"
            firsts = [first for first, _, _ in root.children]
            assert firsts == sorted(firsts) and firsts[0] == b"name00000"
            assert rounds(calls) <= 3, sorted(calls)
            await writer.finish()
            tasks.cancel_scope.cancel()


async def test_a_commit_of_new_nodes_writes_about_one_transaction_a_node(
    tmp_path: Path, monkeypatch, virtual_clock
) -> None:
    """A commit of many new nodes (a directory of small files inline in its leaves)
    begins one ``meta.lmdb`` write transaction per node (the one that saves its
    record), fewer than one per StoreShard call (the journal and the outcomes of the
    calls leaving or answered in the same round of the loop share one) and one per group
    of uploads ending together (holders). Before: each new node also began a write
    transaction that wrote nothing, to look up whether it was registered already (LMDB
    does not count it as a commit, but the loop took the writer's lock for it, and
    waited whenever a worker thread held it), and each call two of its own: 157 begun
    for 48 nodes in 24 calls here, 109 without the first, now ~80."""
    async with storing_through(tmp_path, 4, RING) as (store, _owner, _hosts):
        meta = Metadata(store)
        async with trio.open_nursery() as tasks:
            await tasks.start(store.blocks.remote.run)
            await tasks.start(store.blocks.run)
            folder = store.mkdir(1, "small")
            for i in range(FILES):
                await store.create(folder, f"f{i:05d}", os.urandom(4096))
            await store.data.seal_all()
            store.db.commit_batch()
            begun = 0
            write = store.db.write

            def counted():
                nonlocal begun
                begun += 1
                return write()

            monkeypatch.setattr(store.db, "write", counted)
            calls = store.blocks.remote.store_requests()["calls"]
            result = await meta.commit()
            calls = store.blocks.remote.store_requests()["calls"] - calls
            monkeypatch.undo()
            tasks.cancel_scope.cancel()
        nodes = result.stats.nodes_written
        assert nodes >= FILES // 10, "the files are inline in several leaves"
        assert begun <= nodes + calls + 20, (begun, nodes, calls)
