"""Provider-side repair (issue 13 item 4): while the user U is away, its provider P audits
U's holders with U's delegation, re-creates the shards of holders that vanished on U's
other partners, and journals the moves; U merges the signed journal when it returns.

Real parts in-process: U, P and sixteen hosts are ``PeerNode``s (real services, LMDB,
loopback sockets); U's blocks are sealed and placed by the real block store. A host
"vanishes" by no longer answering (its service hangs, as a machine switched off).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
from inproc import LocalStore, PeerNode, peer_nodes, slow_jump_clock
from networked import store_through, upload

from fluidfs import keys
from fluidfs.blocks import merkle
from fluidfs.blocks.codec import AEGIS, CAUCHY, BlockCodec
from fluidfs.blocks.provider_repairs import ProviderRepairs
from fluidfs.blocks.record import NO_HOLDER
from fluidfs.net.errors import RpcError
from fluidfs.peers.delegation import sign_delegation
from fluidfs.peers.repairjournal import Move, sign_move
from fluidfs.service.customer_repair import (
    CustomerRepairer,
    RepairForCustomersPolicy,
    _recreate,
)
from fluidfs.service.host import PeerService
from fluidfs.store.repairbook import Capability, PeerRoom, caps_quota

K, N = 8, 12
HOSTS = 16
RING = keys.KeyRing(keys.generate(shards_total=N, shards_needed=K))
MIB = 1 << 20


class Switchable(PeerService):
    """A real peer service that can be switched off (it stops answering)."""

    silent = False

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if self.silent:
            await trio.sleep_forever()
        return await super().handle(peer_key, op, args)


class Lab:
    def __init__(self, store, owner, provider, hosts, repairs, repairer) -> None:
        self.store: LocalStore = store
        self.owner: PeerNode = owner
        self.provider: PeerNode = provider
        self.hosts: list[PeerNode] = hosts
        self.repairs: ProviderRepairs = repairs
        self.repairer: CustomerRepairer = repairer
        self.by_index = {owner.peers.get(h.key).index: h for h in hosts}


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Virtual time that moves only while nothing runs (inproc.slow_jump_clock): a silent
    holder's 0.3 s timeout passes in no time, and an answering one's never passes however
    loaded the machine (on real time, at load 40, every store timed out: nothing placed)."""
    return slow_jump_clock()


async def with_lab(tmp_path: Path, body) -> None:
    async with peer_nodes(tmp_path, HOSTS, service=Switchable) as (nursery, hosts):
        provider = await PeerNode(tmp_path / "p", provider=True).start(nursery)
        owner = await PeerNode(tmp_path / "owner", RING).start(nursery, listen=False)
        store = LocalStore(tmp_path / "state", RING)
        try:
            store_through(store, owner, hosts, 4 * MIB)
            provider.service.provider.book.add(owner.key, 64 * MIB)
            repairs = ProviderRepairs(owner.conns, provider.key, owner.key, provider.addr,
                                      RING.signing_key, store.blocks, owner.peers,
                                      owner.ledger)
            # The timeout is real time: P's first pass dials a dozen holders at once and
            # each answers from a worker thread. At 0.3 s a loaded machine (load 15+ on 2
            # cores) made live holders look silent, hence gone (lost_after=0): fewer than
            # K good shards, nothing placed, in half the runs. A silent holder costs one
            # timeout per pass, so 2 s costs these tests about 3 s in all.
            repairer = CustomerRepairer(
                provider.service.repair_book, provider.conns, provider.keyring.signing_key,
                trio.CapacityLimiter(2),
                RepairForCustomersPolicy(interval=1.0, lost_after=0.0, timeout=2.0))
            await body(Lab(store, owner, provider, hosts, repairs, repairer))
            nursery.cancel_scope.cancel()
        finally:
            store.close()
            owner.close()
            provider.close()


def state_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


async def test_the_provider_recreates_lost_shards_while_the_user_is_away_and_the_user_merges_them(
        tmp_path, virtual_clock):
    """U uploads its capability and goes away; three of its holders vanish; P re-creates
    their shards on U's other partners under U's agreements; U comes back, merges the
    journal (P drops it), and every copy its records name is good. P's state holds no
    plaintext, content key or nonce of U's. Fails before provider-side repair: nothing
    re-creates the shards while U is away."""

    async def body(lab: Lab) -> None:
        plain = [os.urandom(50_000) for _ in range(2)]
        blocks = [await upload(lab.store, data) for data in plain]
        await lab.repairs.grant()
        assert await lab.repairs.upload_caps() == 2
        await lab.repairs.leave()
        assert lab.repairer.is_away(lab.provider.service.repair_book.grant(lab.owner.key))

        gone = [lab.by_index[h] for h in blocks[0].holders[:3]]
        for host in gone:
            host.service.silent = True
        placed = await lab.repairer.repair_pass()
        lost = sum(1 for s in blocks for h in s.holders if lab.by_index[h] in gone)
        assert placed == lost * blocks[0].record.shard_size
        assert lab.repairer.repaired[lab.owner.key] == lost

        # U is back: it merges the journal and P drops it.
        merge = await lab.repairs.merge_journal()
        assert (merge.merged, merge.refused) == (lost, 0)
        book = lab.provider.service.repair_book
        assert book.journal_after(lab.owner.key, 0, 10) == ([], False)
        for stored, data in zip(blocks, plain, strict=True):
            now = lab.store.blocks.load(stored.record.block_id)
            assert len(set(now.holders)) == N and NO_HOLDER not in now.holders
            for index, holder in enumerate(now.holders):
                host = lab.by_index[holder]
                assert host not in gone
                shard = host.shards.get(lab.owner.key, now.record.shard_ids[index])
                assert shard is not None
                assert merkle.shard_id(shard) == now.record.shard_ids[index]
            assert await lab.store.blocks.read(stored.record.block_id, 0, len(data)) == data
        # Usage U counts at each host is what the host holds for it.
        for host in lab.hosts:
            if host not in gone:
                assert lab.owner.ledger.get(host.key).they_use == host.shards.used(lab.owner.key)

        # P never held a key, a nonce or a plaintext byte of U's.
        seen = state_bytes(tmp_path / "p")
        for stored, data in zip(blocks, plain, strict=True):
            for secret in (stored.record.wrapped_key, stored.record.nonce, data[:64],
                           data[25_000:25_064]):
                assert secret not in seen
        for secret in (RING.keyfile.root, RING.wrap_key, RING.dedup_key, RING.metadata_key):
            assert secret not in seen

    await with_lab(tmp_path, body)


@pytest.mark.parametrize("version", [AEGIS, CAUCHY])
def test_the_provider_recreates_shards_of_either_erasure_code_without_being_told(version):
    """A capability does not name the block's code (zfec, or layout 4's ISA-L Reed-
    Solomon): the provider finds it by the shard ids, and never places a wrong shard."""
    codec = BlockCodec(dedup_key=os.urandom(32), wrap_key=os.urandom(32), needed=8,
                       total=12, version=version)
    record, sealed = codec.seal(os.urandom(300_000))
    shards = [bytes(s) for s in sealed]
    cap = Capability(record.block_id, 8, 12, record.shard_size, list(record.shard_ids),
                     [b""] * 12)
    for good, lost in ((range(4, 12), [0, 3, 1]), (range(0, 8), [11]), (range(2, 10), [0])):
        made = _recreate(cap, {i: shards[i] for i in good}, lost)
        assert made == {i: shards[i] for i in lost}
    spoiled = {i: shards[i] for i in range(4, 12)}
    spoiled[5] = bytes(len(shards[5]))
    assert _recreate(cap, spoiled, [0]) == {}
    lying = Capability(record.block_id, 8, 12, record.shard_size + 1, list(record.shard_ids),
                       [b""] * 12)
    assert _recreate(lying, {i: shards[i] for i in range(4, 12)}, [0]) == {}


async def test_the_provider_does_nothing_while_the_user_is_present(tmp_path, virtual_clock):
    """A customer that refreshes its grant is present: its vanished holders are its own
    repairer's business, and P places nothing."""

    async def body(lab: Lab) -> None:
        stored = await upload(lab.store, os.urandom(50_000))
        await lab.repairs.grant()
        await lab.repairs.upload_caps()
        lab.by_index[stored.holders[0]].service.silent = True
        assert await lab.repairer.repair_pass() == 0
        assert lab.provider.service.repair_book.journal_after(lab.owner.key, 0, 5)[0] == []

    await with_lab(tmp_path, body)


async def test_customer_repair_ops_refuse_strangers_bad_pages_and_overdraft(
        tmp_path, virtual_clock):
    """Only a customer may grant; a delegation must name the provider and be the caller's;
    capability pages must be in range, ascending, K <= N, and within the quota."""

    async def body(lab: Lab) -> None:
        p, u = lab.provider, lab.owner
        stranger = lab.hosts[0]
        for op, args in [("RepairAway", {}), ("FetchJournal", {"after": 0, "limit": 1}),
                         ("AckJournal", {"upto": 5}),
                         ("RepairCaps", {"after": b"", "upto": b"\xff" * 32, "put": []})]:
            with pytest.raises(RpcError) as caught:
                await stranger.conns.call(p.key, op, args, addr=p.addr)
            assert caught.value.code == "refused", op
        for bad in (sign_delegation(RING.signing_key, stranger.key).raw,  # names another
                    sign_delegation(stranger.keyring.signing_key, p.key).raw):  # not U's
            with pytest.raises(RpcError) as caught:
                await u.conns.call(p.key, "RepairGrant", {"delegation": bad, "peers": []},
                                   addr=p.addr)
            assert caught.value.code == "bad_request"

        def cap(block: bytes, k: int = 2, n: int = 3) -> dict:
            return {"block": block, "k": k, "n": n, "size": 100, "ids": [os.urandom(32)] * n,
                    "holders": [b""] * n}

        low, high = b"\x01" * 32, b"\x02" * 32
        for page in [{"after": high, "upto": low, "put": []},
                     {"after": b"", "upto": low, "put": [cap(high)]},
                     {"after": b"", "upto": high, "put": [cap(high), cap(low)]},
                     {"after": b"", "upto": high, "put": [cap(low, k=4, n=3)]},
                     {"after": b"\x00", "upto": high, "put": []}]:
            with pytest.raises(RpcError) as caught:
                await u.conns.call(p.key, "RepairCaps", page, addr=p.addr)
            assert caught.value.code == "bad_request", page
        quota = caps_quota(64 * MIB)
        big = [cap(bytes([i]) * 32, k=10, n=20) for i in range(1, 65)]  # ~90 KB a page
        with pytest.raises(RpcError) as caught:
            for start in range(0, 256 * 64, 64):
                page = [dict(c, block=(start // 64).to_bytes(2, "big") + c["block"][2:])
                        for c in big]
                page.sort(key=lambda c: c["block"])
                await u.conns.call(p.key, "RepairCaps",
                                   {"after": page[0]["block"][:2] + b"\x00" * 30,
                                    "upto": page[-1]["block"], "put": page}, addr=p.addr,
                                   timeout=30)
        assert caught.value.code == "over_quota"
        assert lab.provider.service.repair_book.usage(u.key) <= quota

    await with_lab(tmp_path, body)


async def test_the_user_refuses_journal_entries_it_cannot_check(tmp_path, virtual_clock):
    """Entries signed by someone else, naming another shard id, a block U does not have,
    a new holder U holds no agreement with, or one that cannot prove the shard (a lying
    provider) are refused and change nothing; a good one merges."""

    async def body(lab: Lab) -> None:
        stored = await upload(lab.store, os.urandom(50_000))
        record = stored.record
        book = lab.provider.service.repair_book
        spare = next(h for h in lab.hosts if lab.owner.peers.get(h.key).index
                     not in stored.holders)
        await lab.repairs.grant()
        await lab.repairs.upload_caps()
        cap = book.cap(lab.owner.key, record.block_id)
        old = cap.holders[0]
        mallory = keys.KeyRing(keys.generate()).signing_key
        p_key = lab.provider.keyring.signing_key

        def entry(signer, index=0, shard=None, block=None, new=None):
            def sign(seq: int) -> bytes:
                move = Move(seq, block or record.block_id, index,
                            shard or record.shard_ids[index], old, new or spare.key, 1)
                return sign_move(signer, lab.owner.key, move)
            return sign

        # A lying P: a well-signed move to a partner that does not hold the shard.
        for sign in (entry(mallory), entry(p_key, shard=os.urandom(32)),
                     entry(p_key, block=os.urandom(32)), entry(p_key, new=os.urandom(32)),
                     entry(p_key)):
            book.move_holder(lab.owner.key, book.cap(lab.owner.key, record.block_id), 0,
                             spare.key, sign)
        merge = await lab.repairs.merge_journal()
        assert (merge.merged, merge.refused) == (0, 5)
        assert lab.store.blocks.load(record.block_id).holders == stored.holders

        # The same move once the spare does hold the shard: merged.
        holder = lab.owner.peers.key_of(stored.holders[0])
        data = (await lab.owner.conns.call(holder, "RetrieveShard",
                                           {"id": record.shard_ids[0]}))["data"]
        await lab.owner.conns.call(spare.key, "StoreShard",
                                   {"shards": [{"id": record.shard_ids[0], "data": data}]})
        book.move_holder(lab.owner.key, cap, 0, spare.key, entry(p_key))
        merge = await lab.repairs.merge_journal()
        assert (merge.merged, merge.refused) == (1, 0)
        now = lab.store.blocks.load(record.block_id)
        assert lab.owner.peers.key_of(now.holders[0]) == spare.key
        assert book.journal_after(lab.owner.key, 0, 10) == ([], False)

    await with_lab(tmp_path, body)


async def test_a_silent_customer_is_away_an_expired_delegation_stops_p_and_room_binds(
        tmp_path, virtual_clock):
    """A customer that stops refreshing its grant (a crash) counts as away after
    ``silence``; past the delegation's expiry P repairs nothing; and P places a shard
    only where U's grant leaves room (room 0 everywhere: nothing placed, nothing
    journalled)."""

    async def body(lab: Lab) -> None:
        stored = await upload(lab.store, os.urandom(50_000))
        await lab.repairs.grant()
        await lab.repairs.upload_caps()
        book = lab.provider.service.repair_book
        grant = book.grant(lab.owner.key)
        assert not lab.repairer.is_away(grant)
        lab.by_index[stored.holders[0]].service.silent = True

        lab.repairer.clock = lambda: grant.seen + 8 * 86400  # past the 7-day delegation
        assert lab.repairer.is_away(grant)
        assert await lab.repairer.repair_pass() == 0

        lab.repairer.clock = lambda: grant.seen + lab.repairer.policy.silence + 100
        full = [PeerRoom(p.key, p.addr, 0) for p in grant.peers]
        book.put_grant(lab.owner.key, grant.delegation, grant.until, full)
        book.db.sync()
        assert await lab.repairer.repair_pass() == 0
        assert book.journal_after(lab.owner.key, 0, 5)[0] == []

        book.put_grant(lab.owner.key, grant.delegation, grant.until, list(grant.peers))
        assert await lab.repairer.repair_pass() == stored.record.shard_size
        assert len(book.journal_after(lab.owner.key, 0, 5)[0]) == 1

    await with_lab(tmp_path, body)
