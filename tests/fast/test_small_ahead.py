"""A directory copy out of a restored tree finds its small files' blocks rebuilt ahead
(issue 16): listing a directory queues the blocks of the small files it names, which
are fetched together (RetrieveShards calls of many shards) before the reads, so the
reads that follow send no request at all. What is queued stays within its bounds.

A real node with three in-process hosts (tests/fast/test_conflicts.py's machine) writes
the files; a fresh machine with the same keyfile lists and reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
from test_conflicts import keyfile_hosts, machine, read_path, sync, write_file

from fluidfs.blocks.ahead import AHEAD_BLOCK, AHEAD_BYTES, SmallAhead
from fluidfs.fs.tree import ROOT_INO

FILES = 24
SIZE = 20_000  # one block each, past the 4 KiB kept inline


async def test_reads_after_a_listing_find_the_small_files_blocks_fetched(
    tmp_path: Path,
) -> None:
    async with keyfile_hosts(tmp_path) as (ring, hosts):
        contents = {f"f{i:02d}".encode(): os.urandom(SIZE) for i in range(FILES)}
        async with machine(tmp_path / "a", ring, hosts, new=True) as a:
            for name, data in contents.items():
                await write_file(a, ROOT_INO, name, data)
            await sync(a)
            await a.keeper.release()
        async with machine(tmp_path / "b", ring, hosts) as b:
            await b.restorer.ensure(ROOT_INO)
            listed = [b.tree.get(ino) for _, _, ino in b.tree.entries(ROOT_INO, 0)]
            batches = b.remote.batches
            calls_before = batches.calls
            assert b.data.read_ahead(listed) == FILES  # what readdir does with a listing
            with trio.fail_after(20):
                while b.blocks.ahead.fetched < FILES:
                    await trio.sleep(0.01)
            ahead_calls = batches.calls - calls_before
            assert ahead_calls < FILES, f"{ahead_calls} RetrieveShards calls for {FILES} blocks"
            assert b.blocks.ahead.bytes == 0
            for name, data in contents.items():
                assert await read_path(b, name) == data
            assert batches.calls - calls_before == ahead_calls, "every read found its block"


async def test_what_is_queued_ahead_stays_within_its_bounds() -> None:
    """A listing larger than the bound queues up to AHEAD_BYTES and skips the rest (they
    are rebuilt by their reads); blocks too large are not taken; a block is queued once."""
    fetched: list[bytes] = []
    release = trio.Event()

    async def fetch(block_id: bytes) -> None:
        await release.wait()
        fetched.append(block_id)

    ahead = SmallAhead(fetch, lambda block_id: False)
    size = 200_000
    many = [(i.to_bytes(32, "big"), size) for i in range(2 * AHEAD_BYTES // size)]
    taken = ahead.queue([*many, (b"x" * 32, AHEAD_BLOCK + 1)])
    assert taken == AHEAD_BYTES // size
    assert ahead.bytes <= AHEAD_BYTES
    assert ahead.skipped == len(many) - taken
    assert ahead.queue(many[:3]) == 0, "queued already"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ahead.run)
        release.set()
        with trio.fail_after(10):
            while len(fetched) < taken:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sorted(fetched) == sorted(block_id for block_id, _ in many[:taken])
    assert ahead.bytes == 0
