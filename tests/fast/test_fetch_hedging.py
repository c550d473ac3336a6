"""Reading a block asks its holders for K shards, no more, while they answer in time
(blocks/remote.py ``fetch_shards``): on a full line each shard asked beyond K is a
needed one delayed. A holder that is late or fails costs one more request, started
when it turns late, so a silent peer holds a read up by one short wait, not a timeout.

The owner and its hosts are real peer services in this process on 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
from inproc import PeerNode, slow_jump_clock
from test_remote_placement import K, N, owner_with_hosts, place_random, sealed, used_hosts

from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER
from fluidfs.blocks.remote import EXTRA_FETCHES, FETCH_TIMEOUT, HEDGE_SLACK
from fluidfs.service.host import PeerService

BLOCKS = 10


class Counting(PeerService):
    """A real peer service that counts the shard retrievals it is asked for; with
    ``silent`` set it never answers them."""

    asked = 0
    silent = False

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op in ("RetrieveShard", "RetrieveShards"):
            type(self).asked += len(args["ids"]) if op == "RetrieveShards" else 1
            if self.silent:
                await trio.sleep_forever()
        return await super().handle(peer_key, op, args)


def counting(silent: bool = False) -> type[Counting]:
    return type("Counted", (Counting,), {"asked": 0, "silent": silent})


async def test_healthy_holders_are_asked_for_k_shards_per_block(tmp_path: Path) -> None:
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        services = [counting() for _ in range(N)]
        hosts = await used_hosts(tmp_path, owner, nursery, services)
        try:
            blocks = await place_random(remote, BLOCKS, 20_000)
            for data, record, holders in blocks:
                assert await remote.fetch(record, holders) == data
            asked = sum(s.asked for s in services)
            # K + 2 at once would ask 40; a hedge now and then on a loaded machine is fine.
            assert asked <= BLOCKS * K + BLOCKS // 2, f"{asked} shard requests for {BLOCKS} blocks"
        finally:
            for host in hosts:
                host.close()


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Time that jumps only when this process is idle (every honest answer is in)."""
    return slow_jump_clock()


async def silent_first_holder(
    tmp_path: Path, owner: PeerNode, remote, nursery: trio.Nursery
) -> tuple[bytes, object, list[int], type[Counting], list[type[Counting]], list[PeerNode]]:
    """A block whose shard 0 (asked first) is on a peer that never answers a shard
    request, the others on honest ones: (data, record, holders, the silent service, the
    honest ones, every host started); the caller closes the hosts."""
    silent, honest = counting(silent=True), [counting() for _ in range(N - 1)]
    mute = await PeerNode(tmp_path / "mute", service=silent).start(nursery)
    hosts = [mute] + [await PeerNode(tmp_path / f"h{i}", service=s).start(nursery)
                      for i, s in enumerate(honest)]
    data = os.urandom(30_000)
    record, shards = sealed(remote, data)
    owner.use(mute)
    holders = [NO_HOLDER] + [LOCAL_HOLDER] * (N - 1)
    await remote.place(record, shards, holders)
    for host in hosts[1:]:
        owner.use(host)
    holders[1:] = [NO_HOLDER] * (N - 1)
    await remote.place(record, shards, holders)
    assert holders[0] == owner.peers.get(mute.key).index and NO_HOLDER not in holders
    return data, record, holders, silent, honest, hosts


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
async def test_a_silent_holder_costs_one_short_wait_and_one_more_request(
    tmp_path: Path, virtual_clock: trio.testing.MockClock, batched: bool
) -> None:
    """Batched: the shards go in RetrieveShards calls, waited for with no task of
    their own (``ShardBatches.submit``): the late one is hedged all the same."""
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        data, record, holders, silent, honest, hosts = await silent_first_holder(
            tmp_path, owner, remote, nursery)
        try:
            if batched:
                await nursery.start(remote.run)
                assert remote.batches.usable(hosts[0].key, record.shard_size)
            started = trio.current_time()
            assert await remote.fetch(record, holders) == data
            waited = trio.current_time() - started
            assert silent.asked == 1
            # The other first one and one more (two more only if a loaded machine made
            # virtual time jump before the first answer came back).
            assert K <= sum(s.asked for s in honest) <= K + 1
            assert waited < FETCH_TIMEOUT, f"read waited {waited:.2f} s: a whole timeout"
            assert waited >= HEDGE_SLACK, "the extra request waits for the slow one to be late"
        finally:
            for host in hosts:
                host.close()


async def test_a_batched_request_past_its_deadline_fails_and_the_next_holder_is_asked(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """With no hedge allowed, a shard request queued in a RetrieveShards batch to a
    silent holder fails at its deadline (FETCH_TIMEOUT, kept by ``fetch_shards``, not
    by a task of its own), counts against the holder, and the next holder is asked."""
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        _data, record, holders, silent, honest, hosts = await silent_first_holder(
            tmp_path, owner, remote, nursery)
        try:
            await nursery.start(remote.run)
            results: list[tuple[bytes, bool]] = []
            remote.on_result = lambda key, ok: results.append((key, ok))
            started = trio.current_time()
            good = await remote.fetch_shards(record, holders, extra=0)
            waited = trio.current_time() - started
            assert len(good) == K and 0 not in good
            assert FETCH_TIMEOUT <= waited < 2 * FETCH_TIMEOUT, f"waited {waited:.2f} s"
            assert (hosts[0].key, False) in results, "the silent holder is counted as such"
            assert silent.asked == 1 and sum(s.asked for s in honest) == K
            assert not remote._fetching, "no request is left counted as running"
        finally:
            for host in hosts:
                host.close()



class Overlapping(PeerService):
    """A real peer service that answers each shard retrieval after a short wait and
    notes the most retrievals it had running at once."""

    running = 0
    most = 0

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op != "RetrieveShard":
            return await super().handle(peer_key, op, args)
        cls = type(self)
        cls.running += 1
        cls.most = max(cls.most, cls.running)
        try:
            await trio.sleep(0.1)
            return await super().handle(peer_key, op, args)
        finally:
            cls.running -= 1


async def test_shards_missing_from_the_records_are_searched_for_at_once(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """A holder list that lags (a fresh machine reading an old snapshot names no holder
    for the shards): the K shards needed are looked for together, one round of the
    peers, not one round per shard. (Fails before: two rounds for K = 2.)"""
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        services = [type(f"Overlap{i}", (Overlapping,), {"running": 0, "most": 0})
                    for i in range(N)]
        hosts = await used_hosts(tmp_path, owner, nursery, services)
        try:
            data = os.urandom(20_000)
            record, shards = sealed(remote, data)
            holders = [NO_HOLDER] * N
            await remote.place(record, shards, holders)
            found: list[tuple[int, int]] = []
            started = trio.current_time()
            rebuilt = await remote.fetch(record, [NO_HOLDER] * N,
                                         on_found=lambda i, h: found.append((i, h)))
            took = trio.current_time() - started
            assert rebuilt == data
            assert sorted(found) == [(i, holders[i]) for i in range(K)]
            assert took < 2 * 0.1, f"{took:.2f} s: one search round after another"
        finally:
            for host in hosts:
                host.close()


class OneLine(PeerService):
    """A real peer service that sends its shard answers one after another, 0.1 s each:
    a host whose uplink the reader's requests queue on."""

    asked = 0
    line: trio.Lock | None = None

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op != "RetrieveShard":
            return await super().handle(peer_key, op, args)
        cls = type(self)
        cls.asked += 1
        if cls.line is None:
            cls.line = trio.Lock()
        async with cls.line:
            await trio.sleep(0.1)
            return await super().handle(peer_key, op, args)


async def test_requests_queued_behind_our_own_are_not_hedged(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """A reader with many blocks in flight queues its requests at each holder; one that
    waits its turn there behind answers still coming to us is not late, and a hedge for
    it would be a shard sent in full and thrown away. So healthy holders that answer one
    request after another are asked for K shards per block and no more. (Fails before:
    lateness counted from the request's start, queue included: 44 or 45 requests
    for 20 blocks.)"""
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        services = [type(f"Line{i}", (OneLine,), {"asked": 0, "line": None})
                    for i in range(N)]
        hosts = await used_hosts(tmp_path, owner, nursery, services)
        try:
            blocks = await place_random(remote, 2 * BLOCKS, 20_000)
            rebuilt: dict[bytes, bytes] = {}

            async def read(record, holders) -> None:
                rebuilt[record.block_id] = await remote.fetch(record, holders)

            async with trio.open_nursery() as readers:
                for _, record, holders in blocks:
                    readers.start_soon(read, record, holders)
            assert all(rebuilt[record.block_id] == data for data, record, _ in blocks)
            asked = sum(s.asked for s in services)
            assert asked <= len(blocks) * K + 1, (
                f"{asked} shard requests for {len(blocks)} blocks of K = {K}")
        finally:
            for host in hosts:
                host.close()


class Gated(PeerService):
    """A real peer service that holds every shard answer until the reader has sent
    all the requests it will (K and its hedges), then lets them all go at once."""

    asked = 0
    wanted = 0
    gate: trio.Event | None = None

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op != "RetrieveShard":
            return await super().handle(peer_key, op, args)
        cls = Gated
        if cls.gate is None:
            cls.gate = trio.Event()
        cls.asked += 1
        if cls.asked >= cls.wanted:
            cls.gate.set()
        await cls.gate.wait()
        return await super().handle(peer_key, op, args)


async def test_hedged_answers_arriving_with_the_kth_do_not_break_the_read(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """Every request a read sent (K, then one more for each that turned late) answers
    in the same moment: the read takes K shards and drops the rest. (Fails before: a
    dropped answer was still listed as a source, so checking the sources raised
    KeyError and the read, and the mount behind it, died.)"""
    async with owner_with_hosts(tmp_path, 0) as (owner, remote, _, nursery):
        hosts = await used_hosts(tmp_path, owner, nursery, [Gated] * N)
        try:
            for _ in range(5):
                Gated.asked, Gated.wanted, Gated.gate = 0, K + EXTRA_FETCHES, None
                data = os.urandom(30_000)
                record, shards = sealed(remote, data)
                holders = [NO_HOLDER] * N
                await remote.place(record, shards, holders)
                assert await remote.fetch(record, holders) == data
                assert Gated.asked == K + EXTRA_FETCHES, "the hedges went out"
        finally:
            for host in hosts:
                host.close()
