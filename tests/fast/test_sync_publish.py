"""`fluidfs sync` keeps sending a root record that reached too few peers, within its time.

A real node with three in-process hosts keeping its records (tests/fast/test_conflicts.py's
machine); the hosts' record stores fail for a moment (their directory replaced by a file,
as a full or broken disk would), so the first publication falls short.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
from test_conflicts import keyfile_hosts, machine, write_file

from fluidfs.fs.tree import ROOT_INO

MIB = 1 << 20


async def test_sync_sends_a_short_root_record_again_until_it_lands(tmp_path: Path) -> None:
    async with keyfile_hosts(tmp_path) as (ring, hosts), machine(
        tmp_path / "a", ring, hosts, new=True
    ) as node:
        stores = [host.records.root for host in hosts]
        for store in stores:  # every PutRecord fails now
            store.rename(store.with_name("records.away"))
            store.write_bytes(b"")

        async def disks_come_back() -> None:
            await trio.sleep(3.0)
            for store in stores:
                store.unlink()
                store.with_name("records.away").rename(store)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(disks_come_back)
            await write_file(node, ROOT_INO, b"note.txt", b"written while peers fail")
            reply = await node.remount_requests.sync(30.0)
        assert reply["committed"] and reply["published"], reply
        assert reply["root_peers"] >= 2


async def test_sync_commits_again_once_a_withheld_commits_blocks_are_placed(
    tmp_path: Path,
) -> None:
    """A commit made while peers refused every store names blocks too few peers hold, so
    its root is withheld; with the tree unchanged since, `fluidfs sync` must still end
    with a published root once the blocks are placed (it used to report "no changes
    since the last commit ... the root record has not reached enough peers yet").

    The withheld commit waits out the placement stall of blocks below K (fs/commit.py
    WEAK_STALL, 10 s, whatever its *stall*) for its data; its first tree node would wait
    as long again, so that commit's per-node limit is cut to a second."""
    async with keyfile_hosts(tmp_path) as (ring, hosts), machine(
        tmp_path / "a", ring, hosts, new=True
    ) as node:
        for host in hosts:  # stores and records refused: no agreement on their side
            host.ledger.end(ring.public_key)
        await write_file(node, ROOT_INO, b"big.bin", os.urandom(300_000))
        limit, node.committer.limit = node.committer.limit, 1.0
        first = await node.commits.commit(user_changed=True, stall=0.5)
        node.committer.limit = limit
        assert first is not None and first.stats.weak_refs, "the commit is withheld"
        for host in hosts:
            host.ledger.record(ring.public_key, we_host=64 * MIB, they_host=64 * MIB,
                               term=3600)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.repairer.run)  # places what the refusals left out
            reply = await node.remount_requests.sync(60.0)
            nursery.cancel_scope.cancel()
        assert reply["published"] and reply["full"], repr(reply)


async def test_sync_waits_for_a_root_record_still_being_sent(tmp_path: Path) -> None:
    """The mount's own commit is still sending its root record (a slow line) when
    `fluidfs sync` runs: the sync finds nothing new to commit and must wait for that
    publication, not report the tree unpublished at once (it did: ``published`` false
    after a fraction of a second)."""
    async with keyfile_hosts(tmp_path) as (ring, hosts), machine(
        tmp_path / "a", ring, hosts, new=True
    ) as node:
        records = node.publisher.records
        send = records.publish

        async def over_a_slow_line(*args, **kw):
            await trio.sleep(1.5)
            return await send(*args, **kw)

        records.publish = over_a_slow_line
        await write_file(node, ROOT_INO, b"note.txt", b"committed by the mount itself")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: node.commits.commit(user_changed=True))
            while node.committer.last is None:  # the commit is made; its root is on its way
                await trio.sleep(0.01)
            reply = await node.remount_requests.sync(30.0)
        assert reply["published"], reply


async def test_a_sync_right_after_a_renewal_publishes_without_renewing_again(
    tmp_path: Path,
) -> None:
    """The lease was renewed by a majority less than one renewal interval ago (here: taken
    at the gate), so no other mount can have taken it: a small sync publishes its root
    without a quorum round of its own (it used to renew before every publication). Once
    the last renewal is older than an interval, a publication renews first again."""
    async with keyfile_hosts(tmp_path) as (ring, hosts), machine(
        tmp_path / "a", ring, hosts, new=True
    ) as node:
        lease = node.keeper.lease
        assert lease.fresh()
        before = lease.seq
        await write_file(node, ROOT_INO, b"note.txt", b"a small change")
        reply = await node.remount_requests.sync(30.0)
        assert reply["committed"] and reply["published"], reply
        assert lease.seq == before, "no renewal: the lease was renewed within an interval"

        lease.fresh_until -= lease.renew + 0.5  # the last renewal started over 5 s ago
        await write_file(node, ROOT_INO, b"later.txt", b"another change")
        reply = await node.remount_requests.sync(30.0)
        assert reply["committed"] and reply["published"], reply
        assert lease.seq == before + 1, "renewed before publishing"
        assert lease.renewed_within(lease.renew)
