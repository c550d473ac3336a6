"""Quotas of the peer service under concurrency (service/quota.py): real LMDB, real trio,
requests served by a real PeerService in this process.

Many stores at once, from one owner or several, must never together hold more than an
owner's quota or the node's donation, and a shard stored twice counts once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
from inproc import ServiceHost

from fluidfs.blocks import merkle
from fluidfs.service.quota import OwnerLocks

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
def host(tmp_path: Path):
    made = ServiceHost(tmp_path, donate=64 * MIB)
    yield made
    made.close()


def shard(size: int) -> dict:
    data = os.urandom(size)
    return {"id": merkle.shard_id(data), "data": data}


async def store_all(host: ServiceHost, owner: bytes, batches: list[list[dict]]) -> list[dict]:
    """Send every batch at once; return the replies."""
    replies: list[dict] = []

    async def one(batch: list[dict]) -> None:
        replies.append(await host.svc.handle(owner, "StoreShard", {"shards": batch}))

    async with trio.open_nursery() as nursery:
        for batch in batches:
            nursery.start_soon(one, batch)
    return replies


async def test_concurrent_stores_of_one_owner_keep_its_quota_and_count_dedups_once(host):
    owner = host.partner(quota=MIB)
    pool = [shard(64 * KIB) for _ in range(24)]  # 1.5 MiB of distinct shards
    # 16 batches of 4 at once, overlapping: most shards are sent more than once.
    batches = [[pool[(7 * i + j) % len(pool)] for j in range(4)] for i in range(16)]
    replies = await store_all(host, owner, batches)
    stored = {sid for reply in replies for sid in reply["stored"]}
    refused = [r for reply in replies for r in reply["refused"]]
    assert refused and all(r["code"] == "over_quota" for r in refused), "the quota was reached"
    assert set(host.shards.ids(owner)) == stored
    assert host.shards.used(owner) == host.held(owner) == 64 * KIB * len(stored) <= MIB


async def test_concurrent_stores_of_many_owners_keep_the_donation(tmp_path: Path):
    host = ServiceHost(tmp_path, donate=MIB)
    owners = [host.partner(quota=MIB) for _ in range(6)]  # together promised 6x the donation
    async with trio.open_nursery() as nursery:
        for owner in owners:
            batches = [[shard(64 * KIB) for _ in range(4)] for _ in range(4)]
            nursery.start_soon(store_all, host, owner, batches)
    held = sum(host.held(owner) for owner in owners)
    assert held == MIB, f"{held} bytes held on a {MIB}-byte donation"
    assert sum(host.shards.used(owner) for owner in owners) == held
    host.close()


async def test_stores_waiting_behind_an_end_take_nothing(host):
    """Stores queued behind one owner's lock once kept the quota read before they waited,
    so an agreement that ended meanwhile still took all of them."""
    owner = host.partner(quota=MIB)
    batches = [[shard(64 * KIB) for _ in range(2)] for _ in range(8)]  # all fit the quota
    replies: list[dict] = []

    async def one(batch: list[dict]) -> None:
        replies.append(await host.svc.handle(owner, "StoreShard", {"shards": batch}))

    # The worker threads are busy, so the first store waits for one holding the lock and
    # the others wait for the lock: every store is parked on trio, none in a thread.
    busy = [object(), object()]
    for borrower in busy:
        host.limiter.acquire_on_behalf_of_nowait(borrower)
    async with trio.open_nursery() as nursery:
        for batch in batches:
            nursery.start_soon(one, batch)
        await trio.testing.wait_all_tasks_blocked()
        assert not replies, "every store is still waiting"
        assert (await host.svc.handle(owner, "EndAgreement", {}))["ended"]
        for borrower in busy:
            host.limiter.release_on_behalf_of(borrower)
    taken = [reply for reply in replies if reply["stored"]]
    assert len(taken) <= 1, f"{len(taken)} of 8 stores took space after the agreement ended"
    assert host.shards.used(owner) == 2 * 64 * KIB * len(taken)


async def test_a_bad_shard_is_refused_and_never_counted(host):
    owner = host.partner(quota=MIB)
    good, bad = shard(1000), shard(1000)
    bad["data"] = os.urandom(1000)
    reply = await host.svc.handle(owner, "StoreShard", {"shards": [good, bad]})
    assert reply == {"stored": [good["id"]], "refused": [{"id": bad["id"], "code": "bad_shard"}]}
    assert host.shards.used(owner) == 1000


async def test_one_owner_stores_one_at_a_time_in_a_bounded_table():
    """Each owner's stores run one after another; the table never holds more owners than
    its limit, and forgets an owner once nothing of it runs or waits."""
    locks = OwnerLocks(limit=2)
    inside: dict[bytes, int] = {}
    most_inside = 0
    largest_table = 0

    async def store(owner: bytes) -> None:
        nonlocal most_inside, largest_table
        async with locks.hold(owner):
            inside[owner] = inside.get(owner, 0) + 1
            most_inside = max(most_inside, inside[owner])
            largest_table = max(largest_table, len(locks))
            await trio.sleep(0.001)
            inside[owner] -= 1

    owners = [os.urandom(32) for _ in range(6)]
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            for owner in owners:
                nursery.start_soon(store, owner)
    assert most_inside == 1, "two stores of one owner ran at once"
    assert largest_table == 2
    assert len(locks) == 0, "owners are forgotten once their stores are done"


async def test_a_store_cancelled_while_waiting_leaves_no_entry():
    locks = OwnerLocks(limit=1)
    first, second = os.urandom(32), os.urandom(32)

    async def wait_briefly(owner: bytes) -> None:
        with trio.move_on_after(0.01):
            async with locks.hold(owner):
                raise AssertionError("got a lock that is held, or room in a full table")

    async with locks.hold(first):
        await wait_briefly(second)  # no room: the table is full
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_briefly, first)  # the owner's lock is held
        assert len(locks) == 1
    assert len(locks) == 0
