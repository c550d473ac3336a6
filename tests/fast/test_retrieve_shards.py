"""Several small shards per request (``RetrieveShards``, issue 15): the host answers only
the caller's own shards, each once, within the answer's bounds; the owner sends its
small shard requests to a holder together, refuses a hostile answer, and falls back to
one shard per request with a peer that does not know the op.

The owner and its hosts are real peer services in this process on 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio
from inproc import PeerNode, peer_nodes
from test_remote_placement import N, owner_with_hosts, place_random, sealed, used_hosts

from fluidfs.blocks import merkle
from fluidfs.blocks.record import NO_HOLDER
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_BATCH_BYTES, MAX_BATCH_IDS, MAX_BATCH_SHARD
from fluidfs.net.tcp import open_rpc
from fluidfs.service.host import PeerService

BLOCKS = 24


def shard(size: int) -> dict:
    data = os.urandom(size)
    return {"id": merkle.shard_id(data), "data": data}


async def store(node: PeerNode, host: PeerNode, shards: list[dict]) -> None:
    for start in range(0, len(shards), 16):
        reply = await node.conns.call(host.key, "StoreShard", {"shards": shards[start:start + 16]})
        assert len(reply["stored"]) == len(shards[start:start + 16])


async def expect_code(code: str, coro) -> None:
    with pytest.raises(RpcError) as info:
        await coro
    assert info.value.code == code, info.value


async def test_host_answers_own_shards_once_and_others_as_missing(tmp_path: Path) -> None:
    async with peer_nodes(tmp_path, 3) as (_, (host, owner, other)):
        owner.use(host)
        other.use(host)
        mine, theirs = [shard(3000) for _ in range(3)], shard(3000)
        await store(owner, host, mine)
        await store(other, host, [theirs])
        unknown = os.urandom(32)
        ids = [mine[0]["id"], mine[0]["id"], theirs["id"], unknown, mine[1]["id"]]
        reply = await owner.conns.call(host.key, "RetrieveShards", {"ids": ids})
        assert reply["found"] == [{"id": s["id"], "data": s["data"]} for s in mine[:2]]
        assert reply["missing"] == [theirs["id"], unknown]
        # the other owner gets its own shard, and only that
        reply = await other.conns.call(host.key, "RetrieveShards",
                                       {"ids": [s["id"] for s in mine] + [theirs["id"]]})
        assert reply["found"] == [{"id": theirs["id"], "data": theirs["data"]}]


async def test_host_refuses_strangers_and_malformed_requests(tmp_path: Path) -> None:
    async with peer_nodes(tmp_path, 2) as (_, (host, owner)):
        port = int(host.addr.rsplit(":", 1)[1])
        async with open_rpc("127.0.0.1", port, owner.keyring.signing_key, ops={}) as conn:
            # no agreement yet: a stranger's request never reaches the shard store
            await expect_code("no_agreement", conn.call("RetrieveShards",
                                                        {"ids": [os.urandom(32)]}))
            owner.use(host)
            too_many = [os.urandom(32) for _ in range(MAX_BATCH_IDS + 1)]
            for args in ({"ids": too_many}, {"ids": []}, {"ids": os.urandom(32)},
                         {"ids": [os.urandom(31)]}, {"ids": [7]}, {"id": os.urandom(32)},
                         {"ids": [os.urandom(32)], "for": os.urandom(32)},
                         {"ids": [os.urandom(32)], "delegation": b"x"}):
                await expect_code("bad_request", conn.call("RetrieveShards", args))
            assert (await conn.call("RetrieveShards", {"ids": [os.urandom(32)]}))["found"] == []


async def test_host_answer_stays_within_its_byte_bound(tmp_path: Path) -> None:
    async with peer_nodes(tmp_path, 2) as (_, (host, owner)):
        owner.use(host)
        size = 60 * 1024
        small = [shard(size) for _ in range(MAX_BATCH_BYTES // size + 3)]
        big = shard(MAX_BATCH_SHARD + 1)
        await store(owner, host, [big, *small])
        ids = [big["id"]] + [s["id"] for s in small]
        reply = await owner.conns.call(host.key, "RetrieveShards", {"ids": ids})
        total = sum(len(item["data"]) for item in reply["found"])
        assert total <= MAX_BATCH_BYTES
        assert [item["id"] for item in reply["found"]] == ids[1:1 + MAX_BATCH_BYTES // size]
        assert reply["missing"] == []  # the rest (and the big one) are asked again


async def test_small_shards_to_one_holder_go_together(tmp_path: Path) -> None:
    asked: list[str] = []

    class Counting(PeerService):
        async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
            if op.startswith("RetrieveShard"):
                asked.append(op)
            return await super().handle(peer_key, op, args)

    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        hosts = await used_hosts(tmp_path, owner, nursery, [Counting] * N)
        try:
            await nursery.start(remote.run)
            blocks = await place_random(remote, BLOCKS, 4000)
            got: dict[int, bytes] = {}

            async def read(i: int) -> None:
                _, record, holders = blocks[i]
                got[i] = await remote.fetch(record, holders)

            async with trio.open_nursery() as readers:
                for i in range(BLOCKS):
                    readers.start_soon(read, i)
            assert got == {i: data for i, (data, _, _) in enumerate(blocks)}
            needed = BLOCKS * remote.codec.needed
            assert remote.batches.shards >= needed - 2 * remote.codec.needed
            assert len(asked) <= needed // 4, asked
            counted = remote.retrieve_requests()  # what `fluidfs status --json` reports
            assert counted["calls"] == len(asked)
            assert counted["shards"] == remote.batches.shards + asked.count("RetrieveShard")
        finally:
            for host in hosts:
                host.close()


class Hostile(PeerService):
    """Answers RetrieveShards with shards it was not asked for, an id twice, or more
    bytes than the answer may hold (each fits the op's schema)."""

    mode = ""

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op != "RetrieveShards":
            return await super().handle(peer_key, op, args)
        ids = args["ids"]
        if self.mode == "unasked":
            return {"found": [{"id": os.urandom(32), "data": b"x"}], "missing": []}
        if self.mode == "twice":
            return {"found": [{"id": ids[0], "data": b"x"}] * 2, "missing": []}
        if self.mode == "missing-and-found":
            return {"found": [{"id": ids[0], "data": b"x"}], "missing": [ids[0]]}
        return {"found": [{"id": sid, "data": bytes(MAX_BATCH_SHARD)} for sid in ids],
                "missing": []}


@pytest.mark.parametrize("mode", ["unasked", "twice", "missing-and-found", "oversized"])
async def test_owner_refuses_a_hostile_answer(tmp_path: Path, mode: str) -> None:
    service = type("H", (Hostile,), {"mode": mode})
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        host = await PeerNode(tmp_path / "h", service=service).start(nursery)
        try:
            owner.use(host)
            await nursery.start(remote.run)
            count = MAX_BATCH_BYTES // MAX_BATCH_SHARD + 1
            ids = [os.urandom(32) for _ in range(count)]
            failures: list[str] = []

            async def ask(sid: bytes) -> None:
                try:
                    await remote.batches.get(host.key, sid, 10)
                except RpcError as exc:
                    failures.append(exc.code)

            async with trio.open_nursery() as askers:
                for sid in ids:
                    askers.start_soon(ask, sid)
            assert failures == ["bad_reply"] * count
            assert remote.batches.shards == 0
        finally:
            host.close()


class Older(PeerService):
    """A peer of an older version: it does not know RetrieveShards."""

    batch_calls = 0

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op == "RetrieveShards":
            type(self).batch_calls += 1
            raise RpcError("unknown_op", f"{op} is not served here")
        return await super().handle(peer_key, op, args)


async def test_a_peer_without_the_op_is_asked_one_shard_at_a_time(tmp_path: Path) -> None:
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        service = type("O", (Older,), {"batch_calls": 0})
        hosts = await used_hosts(tmp_path, owner, nursery, [service] * N)
        try:
            await nursery.start(remote.run)
            for _ in range(4):
                data = os.urandom(3000)
                record, shards = sealed(remote, data)
                holders = [NO_HOLDER] * N
                await remote.place(record, shards, holders)
                assert await remote.fetch(record, holders) == data
            assert service.batch_calls <= N  # once per peer, then remembered
        finally:
            for host in hosts:
                host.close()


async def test_a_small_answer_is_verified_without_a_thread_hop(
    tmp_path: Path, monkeypatch
) -> None:
    """The shards of a small RetrieveShards answer (a metadata node's, on a fresh
    machine's walk) are checked against their ids on the loop, which costs it less than
    a worker-thread hop; a large answer is still checked in a worker thread. A shard
    that does not match its id is still refused (test_liars covers the lying peer)."""
    real = trio.to_thread.run_sync
    in_threads: list[str] = []

    async def noting(fn, *args, **kw):
        in_threads.append(getattr(fn, "__name__", ""))
        return await real(fn, *args, **kw)

    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        host = await PeerNode(tmp_path / "h", service=PeerService).start(nursery)
        try:
            owner.use(host)
            await nursery.start(remote.run)
            small = [shard(3000) for _ in range(4)]
            large = [shard(MAX_BATCH_SHARD) for _ in range(8)]
            await store(owner, host, small + large)
            monkeypatch.setattr(trio.to_thread, "run_sync", noting)
            for group in (small, large):
                got: dict[bytes, tuple[bytes | None, bool]] = {}

                async def ask(item: dict, got: dict = got) -> None:
                    got[item["id"]] = await remote.batches.get(host.key, item["id"], 10)

                async with trio.open_nursery() as askers:
                    for item in group:
                        askers.start_soon(ask, item)
                assert got == {item["id"]: (item["data"], True) for item in group}
                if group is small:
                    assert "_verify" not in in_threads, in_threads
            assert "_verify" in in_threads, "a large answer is hashed in a worker thread"
        finally:
            host.close()


class Spawned(trio.abc.Instrument):
    """Counts the tasks started while it is installed."""

    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def test_batched_shard_requests_make_no_event_per_shard(tmp_path: Path) -> None:
    """A block read's batched shard requests are told of their answer by a callback: none
    makes a ``trio.Event`` (creating one cost the loop more than the rest of queueing the
    request, a fresh machine's walk queues ~20 a directory). Fails before: one per shard
    request (K = 2 for each of 24 blocks)."""
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        hosts = await used_hosts(tmp_path, owner, nursery, [PeerService] * N)
        try:
            await nursery.start(remote.run)
            blocks = await place_random(remote, BLOCKS, 4000)
            made = 0

            def count(frame, event, _arg) -> None:
                nonlocal made
                if (event == "call" and frame.f_code.co_name == "__init__"
                        and "trio._sync.Event" in frame.f_code.co_filename
                        and frame.f_back.f_code.co_filename.endswith("shardbatch.py")):
                    made += 1

            sys.setprofile(count)
            try:
                got = [await remote.fetch(record, holders) for _, record, holders in blocks]
            finally:
                sys.setprofile(None)
            assert got == [data for data, _, _ in blocks]
            assert remote.batches.shards >= BLOCKS * remote.codec.needed - 2
            assert made == 0, f"{made} events made by the batches for {BLOCKS} block reads"
        finally:
            for host in hosts:
                host.close()


async def test_batched_shard_requests_start_no_task_per_shard(tmp_path: Path) -> None:
    """A block whose shards go in RetrieveShards calls waits for them without a task
    (and a cancel scope) per shard: the tasks a read of many small blocks starts are the
    calls' senders, a few per holder, not K per block. On a fresh machine's walk the
    per-shard tasks were the largest share of the mount's loop after the restore's
    writes (issue 15: 13.5 % of its busy samples, at ~20 shards a directory).

    Fails before: K tasks per block (48 at K = 2 for 24 blocks, plus the senders)."""
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        hosts = await used_hosts(tmp_path, owner, nursery, [PeerService] * N)
        try:
            await nursery.start(remote.run)
            blocks = await place_random(remote, BLOCKS, 4000)
            got: dict[int, bytes] = {}

            async def read(i: int) -> None:
                _, record, holders = blocks[i]
                got[i] = await remote.fetch(record, holders)

            spawned = Spawned()
            trio.lowlevel.add_instrument(spawned)
            try:
                async with trio.open_nursery() as readers:
                    for i in range(BLOCKS):
                        readers.start_soon(read, i)
            finally:
                trio.lowlevel.remove_instrument(spawned)
            assert got == {i: data for i, (data, _, _) in enumerate(blocks)}
            assert remote.batches.shards >= BLOCKS * remote.codec.needed - 2
            tasks = spawned.count - BLOCKS  # the readers themselves
            # Senders: at most BATCHES_PER_PEER at once per holder, again for each call
            # (a few calls per holder here); the host side runs in this process too:
            # each call is served by a task of its own there.
            assert tasks < BLOCKS * remote.codec.needed // 2, (
                f"{tasks} tasks for {BLOCKS} blocks of K = {remote.codec.needed}")
        finally:
            for host in hosts:
                host.close()
