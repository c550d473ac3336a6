"""A directory copy out of a restored tree finds its small files' blocks rebuilt ahead
(issue 16): opening a file of a listed directory queues the blocks of the small files
the listing named (a listing alone queues nothing, issue 15), which are fetched
together (RetrieveShards calls of many shards) before the reads, so the reads that
follow send no request at all. What is queued stays within its bounds.

A real node with three in-process hosts (tests/fast/test_conflicts.py's machine) writes
the files; a fresh machine with the same keyfile lists and reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing
from test_conflicts import keyfile_hosts, machine, read_path, sync, write_file

from fluidfs.blocks.ahead import (
    AHEAD_AT_ONCE,
    AHEAD_BLOCK,
    AHEAD_BYTES,
    AHEAD_WAVE,
    ListedFiles,
    SmallAhead,
)
from fluidfs.fs.tree import ROOT_INO

FILES = 24
SIZE = 20_000  # one block each, past the 4 KiB kept inline


async def test_a_listing_fetches_nothing_until_one_of_its_files_is_opened(
    tmp_path: Path, monkeypatch
) -> None:
    """readdir (as ``find`` and ``cp -r`` send it) queues no block: a walk that reads no
    file fetches no data. Opening the first listed file queues the blocks of the small
    files listed with it, which are fetched together (RetrieveShards calls of many
    shards) before the reads, so the reads that follow send no request at all.
    ``pyfuse3.readdir_reply`` stands in for the kernel's buffer.

    Fails before: the listing itself queued every small file's block."""
    import pyfuse3

    from fluidfs.fs.operations import FluidOperations

    async with keyfile_hosts(tmp_path) as (ring, hosts):
        contents = {f"f{i:02d}".encode(): os.urandom(SIZE) for i in range(FILES)}
        async with machine(tmp_path / "a", ring, hosts, new=True) as a:
            for name, data in contents.items():
                await write_file(a, ROOT_INO, name, data)
            await sync(a)
            await a.keeper.release()
        async with machine(tmp_path / "b", ring, hosts) as b:
            await b.restorer.ensure(ROOT_INO)
            ops = FluidOperations(b.tree, b.data, str(tmp_path))
            listed: list[int] = []
            monkeypatch.setattr(pyfuse3, "readdir_reply",
                                lambda token, name, attrs, cookie: listed.append(attrs.st_ino)
                                or True)
            batches = b.remote.batches
            calls_before = batches.calls
            await ops.readdir(ROOT_INO, 0, None)
            assert len(listed) == FILES
            assert b.blocks.ahead.bytes == 0, "the listing queued blocks"
            assert batches.calls == calls_before
            await ops.open(listed[0], os.O_RDONLY, None)
            with trio.fail_after(20):
                while b.blocks.ahead.fetched < FILES:
                    await trio.sleep(0.01)
            ahead_calls = batches.calls - calls_before
            assert ahead_calls < FILES, f"{ahead_calls} RetrieveShards calls for {FILES} blocks"
            assert b.blocks.ahead.bytes == 0
            await ops.open(listed[1], os.O_RDONLY, None)
            assert b.blocks.ahead.bytes == 0, "queued once"
            for name, data in contents.items():
                assert await read_path(b, name) == data
            assert batches.calls - calls_before == ahead_calls, "every read found its block"


def test_listed_files_are_queued_a_window_at_a_time_within_their_bound() -> None:
    """Opening a listed file gives the files listed from it on, a window at a time
    (topped up once the opens pass half of it); unlisted files give nothing; the
    least recently listed directories are forgotten past the bound."""
    listed = ListedFiles(limit=100, window=10)
    listed.listed(1, list(range(100, 112)), restart=True)  # a listing in two replies
    listed.listed(1, list(range(112, 130)), restart=False)
    assert listed.opened(999) == []
    assert listed.opened(100) == list(range(100, 110))
    assert listed.opened(101) == [], "queued already"
    assert listed.opened(105) == list(range(110, 115)), "topped up from half way"
    listed.listed(2, list(range(200, 260)), restart=True)
    listed.listed(3, list(range(300, 330)), restart=True)  # 120 > 100: 1 goes
    assert len(listed) == 90
    assert listed.opened(120) == []
    assert listed.opened(300) == list(range(300, 310))
    listed.listed(3, list(range(300, 305)), restart=True)  # listed again from the start
    assert len(listed) == 65
    assert listed.opened(300) == list(range(300, 305))
    for parent in range(1000, 2000):  # directories without small files: nothing kept
        listed.listed(parent, [], restart=True)
    assert len(listed._dirs) == 2


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


async def test_rebuilds_ahead_start_in_waves() -> None:
    """Once AHEAD_AT_ONCE rebuilds run, an ended one does not start the next alone: the
    next ones start AHEAD_WAVE together (their shard requests to one peer then share a
    RetrieveShards call). Fails before: each ended rebuild started one more at once."""
    release: dict[bytes, trio.Event] = {}
    started: list[bytes] = []

    async def fetch(block_id: bytes) -> None:
        started.append(block_id)
        release[block_id] = trio.Event()
        await release[block_id].wait()

    ahead = SmallAhead(fetch, lambda block_id: False)
    blocks = [(i.to_bytes(32, "big"), 1000) for i in range(AHEAD_AT_ONCE + 2 * AHEAD_WAVE)]
    ahead.queue(blocks)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ahead.run)
        await trio.testing.wait_all_tasks_blocked()
        assert len(started) == AHEAD_AT_ONCE
        for n, (block_id, _) in enumerate(blocks[: AHEAD_WAVE - 1], 1):
            release[block_id].set()
            await trio.testing.wait_all_tasks_blocked()
            assert len(started) == AHEAD_AT_ONCE, f"one started after {n} ended"
        release[blocks[AHEAD_WAVE - 1][0]].set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(started) == AHEAD_AT_ONCE + AHEAD_WAVE
        nursery.cancel_scope.cancel()
