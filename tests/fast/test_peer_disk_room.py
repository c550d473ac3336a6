"""Peers' stores leave the state disk's reserve alone (diskspace.py PEER_RESERVE).

A partner's quota and the donation are promises; the disk is what there is. Stores and
records from peers that would leave less than PEER_RESERVE free are refused with
``over_quota`` (the node goes on serving), so our own metadata commits still fit, and
the terms granted to a proposer never promise more than the disk can hold.

The disk fills for real, for this process: a file-size limit (RLIMIT_FSIZE) on the shard
store's LMDB file makes its page writes past it fail as on a full disk (EFBIG, SIGXFSZ
ignored), and the reserve reads the limit as the room left (``diskspace.room``), as the
write-behind batch does (tests/fast/test_write_batch.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from inproc import ServiceHost, room_left

from fluidfs import keys
from fluidfs.blocks import merkle
from fluidfs.diskspace import PEER_RESERVE, DiskReserve, room
from fluidfs.net.errors import RpcError
from fluidfs.peers import rootrecord

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@pytest.fixture
def host(tmp_path: Path):
    made = ServiceHost(tmp_path, donate=GIB, reserve=DiskReserve(tmp_path))
    yield made
    made.close()


def shard(size: int) -> dict:
    data = os.urandom(size)
    return {"id": merkle.shard_id(data), "data": data}


async def test_stores_stop_at_the_reserve_and_our_own_writes_still_fit(host) -> None:
    """With the quota and the donation far above what the disk holds, a partner's stores
    fill the disk up to PEER_RESERVE and are refused past it, one by one as
    ``over_quota``; afterwards our own shard store still commits. Fails on the old code:
    the stores went on into the reserve until an LMDB commit failed for want of room (an
    exception, not an answer), leaving our own writes no room."""
    owner = host.partner(quota=GIB)
    with room_left(host.shards.data_file, PEER_RESERVE + 3 * MIB):
        replies = [await host.svc.handle(owner, "StoreShard",
                                         {"shards": [shard(512 * KIB) for _ in range(8)]})
                   for _ in range(10)]  # 40 MiB sent, 3 MiB of room above the reserve
        stored = [sid for reply in replies for sid in reply["stored"]]
        refused = [r for reply in replies for r in reply["refused"]]
        assert 2 <= len(stored) <= 6, f"{len(stored)} shards of 512 KiB stored in 3 MiB"
        assert len(refused) == 80 - len(stored)
        assert {r["code"] for r in refused} == {"over_quota"}
        assert host.shards.used(owner) == host.held(owner) == 512 * KIB * len(stored)
        # Our own writes: 16 MiB of our shards, inside the reserve peers left alone.
        host.shards.put_many(host.self_key, [(os.urandom(32), os.urandom(MIB))
                                             for _ in range(16)])
    assert room(host.shards.path) > PEER_RESERVE  # the disk itself never was full


async def test_a_record_that_would_eat_the_reserve_is_refused_and_the_node_goes_on(
    host,
) -> None:
    """While our own writes hold all but 1 MiB of the disk (their claims on the shared
    reserve), a partner's PutRecord is answered ``over_quota``; once they are done it is
    kept. Fails on the old code: the record was written into the reserve."""
    owner = keys.KeyRing(keys.generate())
    host.ledger.record(owner.public_key, we_host=GIB, they_host=GIB, term=3600)
    raw = rootrecord.seal(owner, "root", 1, {"pad": os.urandom(1000)})
    with host.reserve.claim_upto(1 << 62, keep=MIB) as ours:
        assert ours > 0
        with pytest.raises(RpcError) as refused:
            await host.svc.handle(owner.public_key, "PutRecord", {"record": raw})
        assert refused.value.code == "over_quota"
        assert host.records.get(owner.public_key, "root") is None
    reply = await host.svc.handle(owner.public_key, "PutRecord", {"record": raw})
    assert reply["stored"]


async def test_terms_promise_no_more_than_the_disk_holds(host) -> None:
    """A proposer asking for 64 MiB (within the donation and its trust share) from a
    disk with 8 MiB of room above the reserve is granted at most that. Fails on the old
    code: the grant came from the donation alone (64 MiB)."""
    peer = os.urandom(32)
    with room_left(host.shards.data_file, PEER_RESERVE + 8 * MIB):
        reply = await host.svc.handle(
            peer, "ProposeAgreement", {"offer": 64 * MIB, "ask": 64 * MIB, "term": 3600}
        )
    assert reply["accepted"], reply
    assert 1 * MIB <= reply["ask"] <= 8 * MIB, reply
    assert reply["offer"] == reply["ask"], "the proposer's ratio is kept"
