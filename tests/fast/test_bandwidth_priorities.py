"""Priorities under an upload limit, end to end: a node busy uploading new data still
answers a peer's retrieval at once (net/bandwidth.py, blocks/remote.py, service side).

Real peer services on 127.0.0.1, real time: the owner's upload limit is 1 MiB/s and
about 0.8 s of uploads are queued when a partner asks it for a shard back.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
from inproc import PeerNode, peer_nodes

from fluidfs import keys
from fluidfs.blocks import merkle
from fluidfs.blocks.codec import BlockCodec
from fluidfs.blocks.record import NO_HOLDER
from fluidfs.blocks.remote import RemoteShards
from fluidfs.net.bandwidth import Bandwidth

KIB, MIB = 1 << 10, 1 << 20
K, N = 2, 4
LIMIT = 1 * MIB
ANSWER = 128 * KIB  # the shard the partner retrieves


async def test_a_peers_retrieval_is_answered_before_queued_uploads(tmp_path: Path) -> None:
    ring = keys.KeyRing(keys.generate(shards_total=N, shards_needed=K))
    async with peer_nodes(tmp_path, N) as (nursery, hosts):
        owner = PeerNode(tmp_path / "owner", ring)
        owner.conns.bandwidth = Bandwidth.limits(LIMIT, None)  # before any connection
        partner = PeerNode(tmp_path / "partner")
        try:
            await owner.start(nursery)
            await partner.start(nursery, listen=False)
            for host in hosts:
                owner.use(host)
            partner.use(owner)
            shard = os.urandom(ANSWER)
            shard_id = merkle.shard_id(shard)
            reply = await partner.conns.call(
                owner.key, "StoreShard", {"shards": [{"id": shard_id, "data": shard}]}
            )
            assert reply["stored"] == [shard_id]

            codec = BlockCodec(dedup_key=ring.dedup_key, wrap_key=ring.wrap_key,
                               needed=K, total=N)
            remote = RemoteShards(owner.conns, owner.peers, owner.ledger, codec,
                                  trio.CapacityLimiter(2))
            data = os.urandom(K * 192 * KIB)  # four shards of 192 KiB: 0.75 s at the limit
            record, shards = codec.seal(data, codec.block_id(data))
            holders = [NO_HOLDER] * N
            up = owner.conns.bandwidth.up
            async with trio.open_nursery() as uploads:
                uploads.start_soon(remote.place, record, shards, holders)
                while up.total < 64 * KIB or up.waiting < N:  # all four stores under way
                    await trio.sleep(0.005)

                before = up.total
                answer = await partner.conns.call(owner.key, "RetrieveShard", {"id": shard_id})
                sent_meanwhile = up.total - before
                uploads_left = up.waiting

            assert answer["data"] == shard
            # Served first, it goes out with little of the uploads beside it (what was on
            # the wire, and what passed while the request came in and was read from the
            # store: up to a quarter second on a loaded machine); taking turns with the
            # four uploads it would wait for four times its size (~5.6 x in all).
            assert sent_meanwhile < 3 * ANSWER, f"{sent_meanwhile} bytes went before it"
            assert uploads_left > 0, "the uploads were still queued when it was answered"
            assert NO_HOLDER not in holders, "and the uploads finished afterwards"
        finally:
            owner.close()
            partner.close()
