"""The peer table on a real LMDB: bounded, claims are not rows, rows that cannot be read
are skipped, referrals favour long-known trusted peers (fluidfs/peers/peerlist.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cbor2
import pytest
import trio
import trio.testing

from fluidfs.peers.address import PeerAddr
from fluidfs.peers.discovery import TokenBucket
from fluidfs.peers.peerlist import (
    MAX_CANDIDATES,
    ORIGIN_PEER,
    Candidates,
    Peer,
    PeerList,
    RowError,
)
from fluidfs.store.db import META_TABLES, Database

ME = b"\x00" * 32


def key() -> bytes:
    return os.urandom(32)


def addr(port: int) -> PeerAddr:
    return PeerAddr("127.0.0.1", port)


@pytest.fixture
def db(tmp_path: Path):
    database = Database(tmp_path / "meta", META_TABLES)
    yield database
    database.env.close()


def reopen(db: Database) -> PeerList:
    return PeerList(db, ME)


def test_claims_are_not_rows_and_the_candidate_table_is_bounded(db):
    peers = PeerList(db, ME)
    for i in range(5000):
        k = key()
        peers.claim(k, addr(1 + i % 60000), source=k)
    assert len(peers) == 0
    assert len(peers.candidates) == MAX_CANDIDATES
    with db.read() as txn:
        assert txn.stat(db["peers"])["entries"] == 0


def test_a_third_party_cannot_move_a_known_peer(db):
    peers = PeerList(db, ME)
    honest, liar = key(), key()
    peers.add(honest, "127.0.0.1:1000")
    peers.claim(honest, addr(2000), source=liar)
    assert honest not in peers.candidates
    peers.claim(honest, addr(3000), source=honest)  # its own word: to be verified
    assert peers.candidates.get(honest).addr == addr(3000)
    assert peers.get(honest).addr == "127.0.0.1:1000"
    peers.claim(honest, addr(2000), source=liar)  # cannot replace the peer's own claim
    assert peers.candidates.get(honest).addr == addr(3000)


def test_rows_admitted_on_a_peers_word_stay_under_the_cap(db):
    peers = PeerList(db, ME)
    peers.capacity = 8
    partners = {key() for _ in range(3)}
    peers.keep = lambda k: k in partners
    for k in partners:
        peers.add(k, "127.0.0.1:1", origin=ORIGIN_PEER)
    mine = peers.add(key(), "127.0.0.1:2")  # chosen by us: never evicted
    admitted = [peers.admit(key(), addr(100 + i)) for i in range(200)]
    assert sum(p is not None for p in admitted) == 8  # then every row is as good as a newcomer
    assert len(peers) == 8 + len(partners) + 1
    assert partners <= {p.key for p in peers} and mine.key in peers
    # A stale, never-answering row is the first to make room for a newcomer.
    stale = next(p for p in peers if p.origin == ORIGIN_PEER and p.key not in partners)
    stale.last_seen = 0.0
    newcomer = peers.admit(key(), addr(999))
    assert newcomer is not None and stale.key not in peers and len(peers) == 12


def test_index_allocation_is_constant_time_and_an_index_is_never_reused(db):
    peers = PeerList(db, ME)
    keys = [key() for _ in range(2000)]
    started = time.thread_time()  # CPU time: a loaded machine's preemption is not ours
    indexes = [peers.add(k).index for k in keys]
    assert time.thread_time() - started < 2.0
    assert indexes == list(range(1, 2001))
    peers.forget(keys[-1])
    peers.save_all()
    again = reopen(db)
    assert keys[-1] not in again and again.key_of(2000) == keys[-1]
    assert again.add(key()).index == 2001
    assert again.add(keys[-1]).index == 2000  # learned again: the same index


async def test_changes_are_written_in_batches_off_the_loop(db):
    peers = PeerList(db, ME)
    k = peers.add(key(), "127.0.0.1:5").key
    peers.record(k, True)
    peers.seen(k, "127.0.0.1:6")
    assert reopen(db).get(k).ok == 0  # not yet written
    await peers.flush()
    back = reopen(db).get(k)
    assert (back.ok, back.addr) == (1, "127.0.0.1:6")
    peers.forget(k)
    await peers.flush()
    assert k not in reopen(db)


def test_unreadable_rows_are_skipped_not_fatal(db, caplog):
    good, bad_addr = b"\x01" + os.urandom(31), b"\x02" + os.urandom(31)
    row = {"v": 1, "index": 3, "addr": "127.0.0.1:9", "first_seen": 1.0, "last_seen": 2.0,
           "referrer": None, "trust": 1.0, "ok": 0, "fail": 0}
    with db.write() as txn:
        t = db["peers"]
        txn.put(good, cbor2.dumps(row), db=t)
        txn.put(bad_addr, cbor2.dumps({**row, "index": 4, "addr": "0.0.0.0:1"}), db=t)
        txn.put(b"\x03" + os.urandom(31), b"\xff\xff", db=t)
        txn.put(b"\x04" + os.urandom(31), cbor2.dumps({**row, "v": 3}), db=t)
        txn.put(b"\x05" + os.urandom(31), cbor2.dumps({**row, "index": True}), db=t)
        txn.put(b"\x06" + os.urandom(31), cbor2.dumps({**row, "index": 3}), db=t)
        txn.put(b"\x07" + os.urandom(31), cbor2.dumps({**row, "trust": float("nan")}), db=t)
        txn.put(b"\x08" + os.urandom(31), cbor2.dumps({**row, "extra": 1}), db=t)
        txn.put(b"\x09" + os.urandom(31), cbor2.dumps({**row, "referrer": b"short"}), db=t)
        txn.put(ME, cbor2.dumps({**row, "index": 5}), db=t)
    peers = PeerList(db, ME)
    assert {p.key for p in peers} == {good, bad_addr}
    assert peers.get(bad_addr).addr == "" and peers.get(good).addr == "127.0.0.1:9"
    assert peers.add(key()).index == 5
    assert sum("skipping" in r.message for r in caplog.records) == 8


@pytest.mark.parametrize("raw", [b"", cbor2.dumps({"v": 2}), cbor2.dumps("text")])
def test_decode_raises_row_error_only(raw):
    with pytest.raises(RowError):
        Peer.decode(os.urandom(32), raw)


def test_referrals_put_trusted_long_known_peers_first(db):
    peers = PeerList(db, ME)
    now = time.time()
    old = [peers.add(key(), f"127.0.0.1:{10 + i}") for i in range(3)]
    for p in old:
        p.first_seen = now - 30 * 86400
    trusted = peers.add(key(), "127.0.0.1:20")
    trusted.first_seen, trusted.trust = now - 86400, 5.0
    fresh = [peers.admit(key(), addr(100 + i)) for i in range(40)]
    for p in fresh:
        p.last_seen = now + 1  # the freshest contacts
    peers.add(key())  # no address: never shared
    peers.claim(k := key(), addr(7), source=k)  # unverified: never shared
    shared = peers.referrals(64)
    assert shared[0] is trusted and {p.key for p in shared[1:4]} == {p.key for p in old}
    assert len(shared) == 44 and all(p.addr for p in shared)
    assert k not in {p.key for p in shared}
    assert [p.key for p in peers.referrals(3, exclude=trusted.key)] == [
        p.key for p in sorted(old, key=lambda p: p.first_seen)
    ]


def test_a_flood_of_claims_cannot_push_out_claims_heard_from_several_peers():
    table = Candidates(limit=32)
    vouched = key()
    table.add(vouched, addr(1), source=key())
    table.add(vouched, addr(1), source=key())
    for _ in range(10_000):
        k = key()
        table.add(k, addr(2), source=k)
    assert len(table) == 32 and vouched in table
    assert table.take().key == vouched  # the best supported is verified first


def test_the_dial_budget_is_a_token_bucket():
    async def main() -> None:
        bucket = TokenBucket(burst=4, interval=10.0)
        taken = 0
        for _ in range(600):  # one minute in 0.1 s steps
            if bucket.ready():
                bucket.take()
                taken += 1
            await trio.sleep(0.1)
        assert taken == 4 + 6 - 1 or taken == 4 + 6

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
