"""Signed address records (peers/addrrecord.py), Ping's ``seen`` echo and the records
passed on by ShareNewPeers (service/discovery.py, peers/discovery.py, peers/reach.py).

Hostile inputs: a record forged for someone else, a replayed older one, one dated in the
future, oversized or malformed bytes. Before these records existed a moved peer could be
found again only when it dialled us itself, and ``Ping`` refused a ``record`` field.
"""

from __future__ import annotations

import time

import cbor2
import nacl.signing
import pytest
import trio
from inproc import PeerNode

from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_ADDR_RECORD
from fluidfs.peers import discovery as discovery_module
from fluidfs.peers.address import PeerAddr
from fluidfs.peers.addrrecord import (
    AddressBook,
    RecordError,
    _signed_part,
    learn,
    make_record,
    read_record,
)
from fluidfs.peers.discovery import Discovery, DiscoveryPolicy
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.reach import Reachability, ReachPolicy

A1 = PeerAddr("198.51.100.7", 7470)
A2 = PeerAddr("198.51.100.8", 7470)


def test_a_record_reads_back_as_signed() -> None:
    key = nacl.signing.SigningKey.generate()
    record = make_record(key, [A1, A2])
    read = read_record(record.raw, expected=bytes(key.verify_key))
    assert (read.key, read.addrs, read.time) == (bytes(key.verify_key), (A1, A2), record.time)


def test_forged_tampered_and_misdirected_records_are_refused() -> None:
    """Nobody but the identity itself can make a record for it, and a record cannot be
    presented as another peer's."""
    victim, attacker = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    victim_id = bytes(victim.verify_key)
    genuine = make_record(victim, [A1])
    # the attacker's own record relabelled with the victim's id
    forged = cbor2.loads(make_record(attacker, [A2]).raw)
    forged["id"] = victim_id
    with pytest.raises(RecordError, match="signature"):
        read_record(cbor2.dumps(forged), expected=victim_id)
    # the victim's record with another address put in
    tampered = cbor2.loads(genuine.raw)
    tampered["addrs"] = [str(A2)]
    with pytest.raises(RecordError, match="signature"):
        read_record(cbor2.dumps(tampered), expected=victim_id)
    # the victim's genuine record presented as the attacker's
    with pytest.raises(RecordError, match="another identity"):
        read_record(genuine.raw, expected=bytes(attacker.verify_key))


def test_future_oversized_and_malformed_records_are_refused() -> None:
    key = nacl.signing.SigningKey.generate()
    me = bytes(key.verify_key)
    future = make_record(key, [A1], when_ms=int(time.time() * 1000) + 3600_000)
    with pytest.raises(RecordError, match="future"):
        read_record(future.raw, expected=me)
    body = cbor2.loads(make_record(key, [A1]).raw)
    for bad in (
        b"\xff" * 10,
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({**body, "v": 2}),
        cbor2.dumps({**body, "extra": 1}),
        cbor2.dumps({**body, "addrs": []}),
        cbor2.dumps({**body, "addrs": ["h:1"] * 4}),
        cbor2.dumps({**body, "time": -1}),
        b"\x00" * (MAX_ADDR_RECORD + 1),
    ):
        with pytest.raises(RecordError):
            read_record(bad, expected=me)
    # only undialable addresses (this machine, multicast), signed: nothing to believe
    addrs, when = ["0.0.0.0:7470", "224.0.0.1:7470"], body["time"]
    sig = key.sign(_signed_part(me, when, addrs)).signature
    undialable = cbor2.dumps({**body, "addrs": addrs, "sig": sig})
    with pytest.raises(RecordError, match="no dialable"):
        read_record(undialable, expected=me)


def test_the_newest_record_wins_and_the_book_is_bounded() -> None:
    key = nacl.signing.SigningKey.generate()
    book = AddressBook(limit=3)
    old, new = make_record(key, [A1], when_ms=1000), make_record(key, [A2], when_ms=2000)
    assert book.offer(new)
    assert not book.offer(old)  # a replay of an older record changes nothing
    assert not book.offer(new)
    assert book.get(new.key) == new
    for _ in range(5):
        book.offer(make_record(nacl.signing.SigningKey.generate(), [A1]))
    assert len(book) == 3


async def test_ping_echoes_the_source_and_moves_the_row_on_a_newer_record(tmp_path) -> None:
    """A peer's own record moves its row; a replay of an older one, or one of another
    identity, does not; the reply tells the caller where its connection comes from."""
    book = AddressBook()
    holder: list[PeerNode] = []
    b = PeerNode(tmp_path / "b", addresses=book,
                 remote_of=lambda key: holder[0].conns.remote.get(key, ""))
    holder.append(b)
    a, c = PeerNode(tmp_path / "a"), PeerNode(tmp_path / "c")
    try:
        async with trio.open_nursery() as nursery:
            for node in (a, b, c):
                await node.start(nursery)
            a.peers.add(b.key, b.addr)
            b.peers.add(a.key, "198.51.100.1:1")
            new = make_record(a.keyring.signing_key, [A1], when_ms=int(time.time() * 1000))
            reply = await a.conns.call(b.key, "Ping", {"record": new.raw})
            host, _ = reply["seen"].rsplit(":", 1)
            assert host == "127.0.0.1"
            assert b.peers.get(a.key).addr == str(A1)

            older = make_record(a.keyring.signing_key, [A2], when_ms=new.time - 1)
            await a.conns.call(b.key, "Ping", {"record": older.raw})
            assert b.peers.get(a.key).addr == str(A1)

            c_record = make_record(c.keyring.signing_key, [A2])
            with pytest.raises(RpcError, match="another identity"):
                await a.conns.call(b.key, "Ping", {"record": c_record.raw})
            with pytest.raises(RpcError) as refused:
                await a.conns.call(b.key, "Ping", {"record": b"\xa0" * 100})
            assert refused.value.code == "bad_request"
            assert b.peers.get(a.key).addr == str(A1)
            nursery.cancel_scope.cancel()
    finally:
        for node in (a, b, c):
            node.close()


async def test_records_passed_on_by_a_third_party_move_known_rows_only_if_genuine(
    tmp_path,
) -> None:
    """Peer B tells A of C's newest record through ShareNewPeers: A moves C's row. A
    record B forged for C (signed by B) moves nothing."""
    b_book = AddressBook()
    b = PeerNode(tmp_path / "b", addresses=b_book)
    a, c = PeerNode(tmp_path / "a"), PeerNode(tmp_path / "c")
    try:
        async with trio.open_nursery() as nursery:
            for node in (a, b, c):
                await node.start(nursery)
            a.peers.add(b.key, b.addr)
            a.peers.add(c.key, "198.51.100.1:1")
            b.peers.add(c.key, c.addr)
            a_book = AddressBook()
            manager = PeerManager(a.conns, a.peers, a.ledger, donate=0, agreement_size=0,
                                  propose=False)
            discovery = Discovery(a.conns, a.peers, a.ledger, manager, DiscoveryPolicy(),
                                  a_book)

            forged = cbor2.loads(make_record(b.keyring.signing_key, [A2]).raw)
            forged["id"] = c.key
            b_book._records[c.key] = read_record(  # what a lying B would hold and pass on
                make_record(c.keyring.signing_key, [A1]).raw)
            object.__setattr__(b_book._records[c.key], "raw", cbor2.dumps(forged))
            await discovery.round()
            assert a.peers.get(c.key).addr == "198.51.100.1:1"

            genuine = make_record(c.keyring.signing_key, [PeerAddr.parse(c.addr)])
            learn(b.peers, b_book, genuine, c.key)
            await discovery.round()
            assert a.peers.get(c.key).addr == c.addr
            assert a_book.get(c.key).time == genuine.time
            nursery.cancel_scope.cancel()
    finally:
        for node in (a, b, c):
            node.close()


async def test_a_record_already_held_is_not_verified_again(tmp_path, monkeypatch) -> None:
    """Discovery asks every second while short of peers, and every answer carries the
    same records: one already held (the same bytes) is skipped, not checked again. Before,
    three rounds passing C's unchanged record made three signature checks (~30% of a
    peer's CPU in a first sync); now one. A newer record is still read and moves the row."""
    checks = []

    def counting_read(raw: bytes, *args, **kwargs):
        checks.append(raw)
        return read_record(raw, *args, **kwargs)

    monkeypatch.setattr(discovery_module, "read_record", counting_read)
    b_book = AddressBook()
    b = PeerNode(tmp_path / "b", addresses=b_book)
    a, c = PeerNode(tmp_path / "a"), PeerNode(tmp_path / "c")
    try:
        async with trio.open_nursery() as nursery:
            for node in (a, b, c):
                await node.start(nursery)
            a.peers.add(b.key, b.addr)
            a.peers.add(c.key, "198.51.100.1:1")
            b.peers.add(c.key, c.addr)
            learn(b.peers, b_book, make_record(c.keyring.signing_key, [A1]), c.key)
            a_book = AddressBook()
            manager = PeerManager(a.conns, a.peers, a.ledger, donate=0, agreement_size=0,
                                  propose=False)
            discovery = Discovery(a.conns, a.peers, a.ledger, manager, DiscoveryPolicy(),
                                  a_book)
            for _ in range(3):
                await discovery.round()
            assert len(checks) == 1
            assert a.peers.get(c.key).addr == str(A1)

            newer = make_record(c.keyring.signing_key, [PeerAddr.parse(c.addr)],
                                when_ms=a_book.get(c.key).time + 1)
            learn(b.peers, b_book, newer, c.key)
            await discovery.round()
            assert len(checks) == 2
            assert a.peers.get(c.key).addr == c.addr
            nursery.cancel_scope.cancel()
    finally:
        for node in (a, b, c):
            node.close()


async def test_reachability_signs_the_listening_address_and_tells_partners(tmp_path) -> None:
    """A node listening on a dialable address signs a record of it and sends it to the
    peers it knows, which move their row for it there."""
    b_book = AddressBook()
    a, b = PeerNode(tmp_path / "a"), PeerNode(tmp_path / "b", addresses=b_book)
    try:
        async with trio.open_nursery() as nursery:
            for node in (a, b):
                await node.start(nursery)
            a.peers.add(b.key, b.addr)
            b.peers.add(a.key, "198.51.100.1:1")
            reach = Reachability(a.conns, a.peers, a.ledger, a.keyring.signing_key,
                                 ReachPolicy(interval=1.0))
            await reach.check()
            assert reach.record is not None and [str(x) for x in reach.record.addrs] == [a.addr]
            assert b.peers.get(a.key).addr == a.addr
            assert b_book.get(a.key) == read_record(reach.record.raw)
            await reach.check()
            assert reach.announced == 1  # nothing changed: no new record
            nursery.cancel_scope.cancel()
    finally:
        for node in (a, b):
            node.close()


async def test_a_wildcard_listening_address_is_claimed_at_the_connections_source(
    tmp_path,
) -> None:
    """A node listening on 0.0.0.0:PORT says so in its Ping: the responder takes the address
    the connection comes from, at that port, as a claim to verify (before, the claim was
    dropped and a node listening on every address was never learned by its callee)."""
    a = PeerNode(tmp_path / "a")
    holder: list[PeerNode] = []
    b = PeerNode(tmp_path / "b", remote_of=lambda key: holder[0].conns.remote.get(key, ""))
    holder.append(b)
    try:
        async with trio.open_nursery() as nursery:
            for node in (a, b):
                await node.start(nursery)
            a.peers.add(b.key, b.addr)
            await a.conns.call(b.key, "Ping", {"addr": "0.0.0.0:7470"})
            claim = b.peers.candidates.get(a.key)
            assert claim is not None and claim.addr == PeerAddr("127.0.0.1", 7470)
            nursery.cancel_scope.cancel()
    finally:
        for node in (a, b):
            node.close()
