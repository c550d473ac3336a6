"""Agreement terms in process: what we accept from a proposer, and what we believe back.

Real LMDB, a real PeerService and, for the proposer side, a real RPC server on
127.0.0.1 answering with whatever terms the test wants.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from fluidfs import keys
from fluidfs.blocks import merkle
from fluidfs.net.messages import REQUEST_SCHEMAS
from fluidfs.net.tcp import serve_tcp
from fluidfs.peers import rootrecord
from fluidfs.peers.agreements import Ledger, TermsPolicy
from fluidfs.peers.connections import Connections
from fluidfs.peers.lifecycle import Lifecycle, LifecyclePolicy
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.host import PeerService
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

MIB = 1 << 20
DONATE = 64 * MIB
TERMS = {"offer": MIB, "ask": MIB, "term": 3600}


class Node:
    """The acceptor: a PeerService over real stores in a temporary directory."""

    def __init__(self, root: Path, terms: TermsPolicy, cooldown: float = 3600.0) -> None:
        self.db = Database(root / "meta", META_TABLES)
        self.shards = ShardStore(root / "shards")
        self.ledger = Ledger(self.db)
        self.peers = PeerList(self.db, os.urandom(32))
        self.records = RecordStore(root / "records")
        self.ended: list[bytes] = []
        self.svc = PeerService(self.shards, self.ledger, self.peers, donate=DONATE, ratio=1.5,
                               limiter=trio.CapacityLimiter(2), records=self.records,
                               on_end=self.ended.append, terms=terms, cooldown=cooldown)

    async def propose(self, peer: bytes, **terms: int) -> dict[str, Any]:
        return await self.call(peer, "ProposeAgreement", {**TERMS, **terms})

    async def call(self, peer: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return await self.svc.handle(peer, op, args)

    def close(self) -> None:
        self.db.close()
        self.shards.close()


@pytest.fixture
def node(tmp_path: Path):
    made = Node(tmp_path, TermsPolicy(new_per_hour=5, max_agreements=4, max_ended=2,
                                      idle_grace=60))
    yield made
    made.close()


def stranger() -> bytes:
    """A new identity (its signing key kept, for records it signs)."""
    key = nacl.signing.SigningKey.generate()
    _signers[key.verify_key.encode()] = key
    return key.verify_key.encode()


# --- acceptor side -------------------------------------------------------------------------


async def test_nothing_for_nothing_is_refused(node):
    for offer, ask in ((0, 0), (MIB, 0), (0, MIB), (MIB - 1, MIB)):
        reply = await node.propose(stranger(), offer=offer, ask=ask)
        assert not reply["accepted"] and "minimum" in reply["reason"], (offer, ask)
    assert len(node.ledger) == 0


async def test_a_stranger_gets_a_small_share_and_trust_raises_it(node):
    new = stranger()
    reply = await node.propose(new, offer=40 * MIB, ask=30 * MIB)
    # 1/16 of the donation, at the proposer's own ratio (rounded in its favour).
    assert reply["accepted"] and reply["ask"] == DONATE // 16
    assert reply["offer"] == 40 * MIB * (DONATE // 16) // (30 * MIB)
    assert node.ledger.get(new).we_host == DONATE // 16
    trusted = stranger()
    node.peers.add(trusted).trust = 100.0
    reply = await node.propose(trusted, offer=60 * MIB, ask=60 * MIB)
    assert reply["accepted"] and reply["ask"] == DONATE // 4, "trust raises the cap to 1/4"


async def test_huge_echoed_terms_cannot_lock_out_later_proposals(node):
    reply = await node.propose(stranger(), offer=2**64 - 1, ask=2**64 - 1)
    assert not reply["accepted"] and "space" in reply["reason"]
    assert (await node.propose(stranger()))["accepted"]


async def test_new_agreements_are_rate_limited_but_renewals_are_not(tmp_path, mock_clock):
    node = Node(tmp_path, TermsPolicy(new_per_hour=3))
    first = stranger()
    assert (await node.propose(first))["accepted"]
    for _ in range(2):
        assert (await node.propose(stranger()))["accepted"]
    late = await node.propose(stranger())
    assert not late["accepted"] and "3 an hour" in late["reason"]
    assert (await node.propose(first, ask=2 * MIB, offer=2 * MIB))["accepted"], "renewal"
    mock_clock.jump(3600 / 3)  # a third of an hour later: one more grant
    assert (await node.propose(stranger()))["accepted"]
    assert not (await node.propose(stranger()))["accepted"]
    node.close()


async def test_concurrent_proposals_cannot_share_one_grant(tmp_path, mock_clock):
    """Two strangers proposing at once while the node made room both passed the rate check
    before either took the one grant left: both were granted."""
    node = Node(tmp_path, TermsPolicy(new_per_hour=3, max_agreements=2, idle_grace=60))
    for _ in range(2):
        assert (await node.propose(stranger()))["accepted"]
    for agreement in node.ledger.active():
        agreement.renewed -= 120  # idle and empty: either may make room
    replies: list[dict[str, Any]] = []

    async def propose() -> None:
        replies.append(await node.propose(stranger()))

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(propose)
    assert sorted(r["accepted"] for r in replies) == [False, True], replies
    assert "an hour" in next(r["reason"] for r in replies if not r["accepted"])
    node.close()


async def test_peer_with_low_trust_is_refused(node):
    bad = stranger()
    peer = node.peers.add(bad)
    for _ in range(2):
        node.peers.record(bad, False)
    assert peer.trust < 0.5
    reply = await node.propose(bad)
    assert not reply["accepted"] and "trust" in reply["reason"]


async def test_an_agreement_we_ended_stays_ended_for_the_cooldown(node, tmp_path):
    peer = stranger()
    assert (await node.propose(peer))["accepted"]
    node.ledger.failed(peer)
    failing = node.ledger.get(peer).failing_since
    assert failing is not None
    # Re-proposing a live agreement renews its terms but never its failure clock.
    assert (await node.propose(peer, ask=2 * MIB, offer=2 * MIB))["accepted"]
    assert node.ledger.get(peer).failing_since == failing
    assert node.ledger.get(peer).we_host == 2 * MIB
    life = Lifecycle(None, node.ledger, node.shards, trio.CapacityLimiter(1),
                     LifecyclePolicy(cooldown=3600), on_end=node.ended.append,
                     records=node.records)
    life.end(peer, "failed audits")
    reply = await node.propose(peer)
    assert not reply["accepted"] and "refused for another" in reply["reason"]
    assert not node.ledger.get(peer).active
    node.ledger.get(peer).ended_at -= 3601  # the cool-down is over
    assert (await node.propose(peer))["accepted"]
    fresh = node.ledger.get(peer)
    assert fresh.active and fresh.failing_since is None


async def test_an_agreement_the_peer_ended_may_start_again(node):
    peer = stranger()
    assert (await node.propose(peer))["accepted"]
    assert (await node.call(peer, "EndAgreement", {}))["ended"]
    assert (await node.propose(peer))["accepted"]


async def test_agreements_are_bounded_and_idle_empty_ones_make_room(node, mock_clock):
    holding, idle = stranger(), [stranger() for _ in range(3)]
    for key in (holding, *idle):
        assert (await node.propose(key))["accepted"]
    data = os.urandom(1000)
    stored = await node.call(holding, "StoreShard", {"shards": [{"id": merkle.shard_id(data),
                                                                 "data": data}]})
    assert stored["stored"]
    record = rootrecord.seal(_ring(idle[0]), "root", 1, {"time": 1})
    assert (await node.call(idle[0], "PutRecord", {"record": record}))["stored"]
    full = await node.propose(stranger())
    assert not full["accepted"] and "at most 4" in full["reason"], "nothing idle long enough"
    for key in (holding, *idle):
        node.ledger.get(key).renewed -= 120  # past the idle grace
    mock_clock.jump(3600)  # the rate limit allows new agreements again
    newcomer = stranger()
    assert (await node.propose(newcomer))["accepted"]
    assert node.ledger.get(holding) is not None, "a peer whose shards we hold stays"
    assert not node.ledger.get(idle[0]).active, "the longest idle, empty agreement ended"
    assert not node.ledger.get(idle[0]).notified, "the lifecycle will tell the peer"
    assert node.ended == [idle[0]], "our shards on it no longer count"
    assert node.records.get(idle[0], "root") is None, "with its records"
    assert len(node.ledger.active()) == 4


async def test_ended_agreements_remembered_are_bounded(node):
    ended = [stranger() for _ in range(3)]
    for key in ended:
        assert (await node.propose(key))["accepted"]
    for key in ended:
        await node.call(key, "EndAgreement", {})
    assert len(node.ledger.ended()) == 3
    assert (await node.propose(stranger()))["accepted"]
    assert len(node.ledger.ended()) < 2, "the oldest ended ones are forgotten first"
    assert node.ledger.get(ended[0]) is None and node.ledger.get(ended[2]) is not None


async def test_records_need_a_live_agreement(node):
    peer = stranger()
    ring = _ring(peer)
    with pytest.raises(Exception, match="agreement"):
        await node.call(peer, "PutRecord", {"record": rootrecord.seal(ring, "root", 1, {})})
    assert (await node.propose(peer))["accepted"]
    await node.call(peer, "PutRecord", {"record": rootrecord.seal(ring, "root", 1, {})})
    await node.call(peer, "EndAgreement", {})
    with pytest.raises(Exception, match="agreement"):
        await node.call(peer, "PutRecord", {"record": rootrecord.seal(ring, "root", 2, {})})


def test_records_refuse_seqs_from_2_63() -> None:
    ring = keys.KeyRing(keys.generate())
    assert rootrecord.parse(rootrecord.seal(ring, "root", 2**63 - 1, {})).seq == 2**63 - 1
    with pytest.raises(ValueError):
        rootrecord.seal(ring, "root", 2**63, {})


# --- proposer side -------------------------------------------------------------------------


class Answers:
    """A peer that accepts every proposal with terms the test chooses."""

    schemas = REQUEST_SCHEMAS

    def __init__(self) -> None:
        self.reply: dict[str, Any] = {}

    async def handle(self, peer_key: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "Ping":
            return {"time": int(time.time())}
        return {"accepted": True, **args, **self.reply}


@pytest.mark.parametrize("reply, why", [
    ({"offer": 2**64 - 1, "ask": 2**64 - 1}, "we would host"),
    ({"offer": 3 * MIB}, "we would host"),
    ({"ask": 5 * MIB}, "it would host"),
    ({"ask": MIB // 2, "offer": MIB // 4}, "it would host"),
    ({"offer": 2 * MIB, "ask": MIB}, "ratio"),
    ({"term": 10**9}, "term"),
])
async def test_proposer_believes_only_terms_it_proposed_or_less(tmp_path, caplog, reply, why):
    db = Database(tmp_path / "meta", META_TABLES)
    ledger = Ledger(db)
    me = nacl.signing.SigningKey.generate()
    peers = PeerList(db, me.verify_key.encode())
    answers, them = Answers(), nacl.signing.SigningKey.generate()
    answers.reply = reply
    conns = Connections(me, answers, peers)
    manager = PeerManager(conns, peers, ledger, donate=DONATE, agreement_size=2 * MIB,
                          term=3600)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_tcp, "127.0.0.1", 0, them, answers)
        await nursery.start(conns.run)
        key, agreed = await manager.add(f"127.0.0.1:{port}")
        assert not agreed and ledger.get(key) is None
        assert peers.get(key).trust < peers.policy.initial
        assert why in caplog.text
        # A counter-proposal that is smaller at our ratio is taken as it is.
        answers.reply = {"offer": MIB, "ask": MIB, "term": 60}
        assert await manager.ensure_agreement(key)
        assert (ledger.get(key).we_host, ledger.get(key).they_host) == (MIB, MIB)
        nursery.cancel_scope.cancel()
    db.close()


# --- helpers -------------------------------------------------------------------------------

_signers: dict[bytes, nacl.signing.SigningKey] = {}


def _ring_of(signing: nacl.signing.SigningKey) -> keys.KeyRing:
    ring = keys.KeyRing(keys.generate())
    ring.signing_key, ring.public_key = signing, signing.verify_key.encode()
    return ring


def _ring(peer: bytes) -> keys.KeyRing:
    return _ring_of(_signers[peer])
