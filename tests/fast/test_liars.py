"""Liars and audits (blocks/suspects.py, blocks/audit.py, peers/peerlist.py): a holder
that answers challenges but serves corrupt shards is caught for good, sampled retrieval
audits catch it without a user read, and one hung holder delays no other's audits.

The owner's block store, its peer side and every host are real parts in this process:
real LMDB, real peer services on 127.0.0.1.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from inproc import LocalStore, PeerNode, peer_nodes, silent_on, slow_jump_clock, until

from fluidfs import keys
from fluidfs.blocks.audit import Auditor, AuditPolicy
from fluidfs.blocks.record import NO_HOLDER
from fluidfs.blocks.remote import RemoteShards
from fluidfs.blocks.repair import Repairer, RepairPolicy
from fluidfs.fs import health
from fluidfs.fs.tree import ROOT_INO
from fluidfs.keys import encode_peer_id
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.faults import FaultInjection

K, N = 2, 4
BLOCKS = 3


@dataclass
class Owner:
    """An owner's block store on the network, with its peer side."""

    peer: PeerNode
    store: LocalStore
    remote: RemoteShards
    liars: list[bytes] = field(default_factory=list)  # on_liar calls
    nursery: trio.Nursery | None = None  # the owner's background work

    def index(self, node: PeerNode) -> int:
        return self.peer.peers.get(node.key).index

    def holders(self, block_id: bytes) -> list[int]:
        return self.store.blocks.load(block_id).holders


@asynccontextmanager
async def owner_on(tmp_path: Path, hosts: list[PeerNode], nursery: trio.Nursery
                   ) -> AsyncIterator[Owner]:
    ring = keys.KeyRing(keys.generate(shards_total=N, shards_needed=K))
    peer = await PeerNode(tmp_path / "owner-peer", ring).start(nursery, listen=False)
    store = LocalStore(tmp_path / "owner", ring)
    owner = Owner(peer, store, None)  # type: ignore[arg-type]
    owner.remote = RemoteShards(peer.conns, peer.peers, peer.ledger, store.codec,
                                store.limiter, on_liar=owner.liars.append)
    try:
        for host in hosts:
            peer.use(host)
        async with trio.open_nursery() as own:  # ends before the stores close
            owner.nursery = own
            await own.start(store.blocks.run)
            store.blocks.use_network(owner.remote)
            yield owner
            own.cancel_scope.cancel()
    finally:
        peer.close()
        store.close()


async def put_blocks(owner: Owner, count: int = BLOCKS) -> list[bytes]:
    ids = [await owner.store.blocks.put(os.urandom(20_000)) for _ in range(count)]
    await until(lambda: all(NO_HOLDER not in owner.holders(b) for b in ids),
                what="every shard placed")
    return ids


async def test_a_holder_caught_serving_a_corrupt_shard_loses_everything_for_good(
    tmp_path: Path,
) -> None:
    """Before this change one corrupt copy cost the liar one shard and one failure; its
    other shards stayed counted, its trust came back with the audits it passed, and a new
    agreement with it could follow at once."""
    async with peer_nodes(tmp_path / "hosts", N - 1) as (nursery, honest):
        liar = await PeerNode(tmp_path / "liar", faults=FaultInjection(lie_on_retrieve=True)
                              ).start(nursery)
        spare = await PeerNode(tmp_path / "spare").start(nursery)
        try:
            async with owner_on(tmp_path, [*honest, liar], nursery) as owner:
                ids = await put_blocks(owner)
                lied = owner.index(liar)
                assert all(lied in owner.holders(b) for b in ids)
                owner.peer.use(spare)  # somewhere for the liar's shards to go
                repairer = Repairer(owner.store.blocks, RepairPolicy(interval=0.05))
                owner.nursery.start_soon(repairer.run)

                stored = owner.store.blocks.load(ids[0])
                # Name the liar and K - 1 others: a read asks K holders at once, so it
                # cannot finish before the liar's answer is checked; the shard it lied
                # about is then looked for on every peer.
                slot = stored.holders.index(lied)
                asked = {slot, *[i for i in range(len(stored.holders)) if i != slot][:K - 1]}
                named = [h if i in asked else NO_HOLDER for i, h in enumerate(stored.holders)]
                good = await owner.remote.fetch_shards(stored.record, named, extra=N)
                assert len(good) >= K, "the read itself goes around the liar"

                await until(lambda: all(lied not in owner.holders(b) for b in ids),
                            what="every shard on the liar counted lost")
                await until(lambda: owner.liars == [liar.key],
                            what="the node told, to end the agreement")
                await until(lambda: all(NO_HOLDER not in owner.holders(b) for b in ids),
                            what="the liar's shards re-created on the spare")
                assert all(owner.index(spare) in owner.holders(b) for b in ids)

                policy = owner.peer.peers.policy
                assert owner.peer.peers.get(liar.key).trust == policy.floor
                for _ in range(100):  # audits it passes from a good copy it keeps
                    owner.peer.peers.record(liar.key, True)
                # (a peer at the floor for ordinary failures would be back above 1.3)
                assert owner.peer.peers.get(liar.key).trust < 2 * policy.floor

                again = PeerList(owner.peer.db, owner.peer.key)  # a restart forgives nothing
                assert again.caught_left(liar.key) > 29 * 24 * 3600
                assert again.get(liar.key).trust == policy.floor

                owner.peer.ledger.end(liar.key)
                liar.ledger.end(owner.peer.key)
                manager = PeerManager(owner.peer.conns, owner.peer.peers, owner.peer.ledger,
                                      donate=1 << 30, agreement_size=1 << 20)
                assert not await manager.ensure_agreement(liar.key)
                assert liar.ledger.get(owner.peer.key) is None, "not even proposed to"
                assert liar.key not in owner.remote.usable_peers(1)
        finally:
            liar.close()
            spare.close()


async def test_sampled_retrieval_audits_catch_a_liar_that_passes_challenges(
    tmp_path: Path,
) -> None:
    """Before this change audits only challenged Merkle leaves, which the liar answers
    from its good copy: every cycle passed and nothing was counted lost."""
    async with peer_nodes(tmp_path / "hosts", N - 1) as (nursery, honest):
        liar = await PeerNode(tmp_path / "liar", faults=FaultInjection(lie_on_retrieve=True)
                              ).start(nursery)
        try:
            async with owner_on(tmp_path, [*honest, liar], nursery) as owner:
                ids = await put_blocks(owner)
                lied = owner.index(liar)
                # A budget of one shard per cycle: each cycle fetches exactly one.
                auditor = Auditor(owner.store.blocks, owner.remote,
                                  AuditPolicy(samples=1, retrieve_budget=1))
                for _ in range(40):
                    await auditor.cycle()
                    if owner.peer.peers.caught_left(liar.key):
                        break
                await until(lambda: owner.liars == [liar.key], what="caught without any read")
                assert auditor.fetches <= 40
                await until(lambda: all(lied not in owner.holders(b) for b in ids),
                            what="every shard on the liar counted lost")
                assert owner.peer.peers.caught_left(liar.key) > 0
                for host in honest:
                    assert owner.peer.peers.caught_left(host.key) == 0
                    assert all(owner.index(host) in owner.holders(b) for b in ids)
        finally:
            liar.close()


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return slow_jump_clock()


async def test_a_hung_holder_delays_no_other_holders_audits(tmp_path: Path, clock) -> None:
    """Before this change a cycle waited for every holder: with one peer that never
    answers, the others were audited once per audit timeout (20 s) instead of every
    interval."""
    async with peer_nodes(tmp_path / "hosts", N - 1) as (nursery, honest):
        hung = await PeerNode(tmp_path / "hung", service=silent_on("AuditShard",
                                                                    "RetrieveShard")
                              ).start(nursery)
        try:
            async with owner_on(tmp_path, [*honest, hung], nursery) as owner:
                await put_blocks(owner, 1)
                auditor = Auditor(owner.store.blocks, owner.remote,
                                  AuditPolicy(interval=1.0, samples=1, timeout=20.0))
                owner.nursery.start_soon(auditor.run)
                await trio.sleep(3.5)
                for host in honest:
                    assert auditor.passed[host.key] >= 3, auditor.passed
                assert auditor.passed[hung.key] == 0
                assert owner.index(hung) in auditor.busy, "its one audit still waits"
        finally:
            hung.close()


async def test_check_read_data_verifies_every_copy_and_names_bad_ones(tmp_path: Path) -> None:
    """Before this change `check --read-data` rebuilt each block from the first K good
    shards: a block with a corrupt copy on the liar was reported OK 4/4."""
    async with peer_nodes(tmp_path / "hosts", N - 1) as (nursery, honest):
        liar = await PeerNode(tmp_path / "liar", faults=FaultInjection(lie_on_retrieve=True)
                              ).start(nursery)
        try:
            async with owner_on(tmp_path, [*honest, liar], nursery) as owner:
                store = owner.store
                ino = await store.create(ROOT_INO, "f", os.urandom(3 * 64 * 1024 + 5))
                ids = [v[1:] for _, v in store.tree.blocks_of(ino)]
                await until(lambda: all(NO_HOLDER not in owner.holders(b) for b in ids),
                            what="every shard placed")
                liar_id = encode_peer_id(liar.key)

                async def check() -> tuple[list[health.FileHealth], health.CopyReport]:
                    copies = health.CopyReport()
                    files = await health.check(store.tree, store.blocks, reachable=None,
                                               read_data=True, copies=copies)
                    return files, copies

                files, copies = await check()
                assert [(f.path, f.state, f.redundancy) for f in files] == [
                    ("/f", "degraded", f"{N - 1}/{N}")]
                assert sorted(b["block"] for b in copies.blocks) == sorted(b.hex() for b in ids)
                # Once caught, the liar is asked to delete what it holds for us: its later
                # copies may be gone rather than corrupt. Either way, on it and only on it.
                assert [b["corrupt"] + b["missing"] for b in copies.blocks] == [
                    [liar_id]] * len(ids), copies.blocks
                assert copies.blocks[0]["corrupt"] == [liar_id]
                assert sum(copies.peers[liar_id].values()) == len(ids)
                assert copies.peers[liar_id]["good"] == 0
                assert copies.peers[encode_peer_id(honest[0].key)] == {"good": len(ids)}
                await until(lambda: owner.liars == [liar.key], what="the liar caught")

                for host in honest[:2]:  # two more copies of every block gone: 1 < K left
                    host.shards.delete_many(owner.peer.key, list(host.shards.ids(owner.peer.key)))
                files, copies = await check()
                assert [(f.path, f.state) for f in files] == [("/f", "unrecoverable")]
                assert [b["good"] for b in copies.blocks] == [1] * len(ids), copies.blocks
        finally:
            liar.close()


async def test_an_upload_that_fails_unexpectedly_does_not_end_the_block_store(
    tmp_path: Path,
) -> None:
    """An exception out of one block's placement (a bug, not a peer's refusal) ended the
    uploader task, its nursery and with it the whole mount. Now the block is left short
    of holders for the top-up and the next block is placed as usual."""
    async with (
        peer_nodes(tmp_path / "hosts", N) as (nursery, hosts),
        owner_on(tmp_path, hosts, nursery) as owner,
    ):
        place = owner.remote.place
        broken = []

        async def fails_once(record, *args, **kw):
            if not broken:
                broken.append(record.block_id)
                raise ValueError("a bug in placement")
            return await place(record, *args, **kw)

        owner.remote.place = fails_once
        first = await owner.store.blocks.put(os.urandom(20_000))
        await until(lambda: broken, what="the failing placement")
        assert first in owner.store.blocks.under, "left for the top-up"
        second = await put_blocks(owner, 1)
        assert NO_HOLDER not in owner.holders(second[0])
