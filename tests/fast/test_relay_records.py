"""Address records that say "I relay" (version 3, peers/addrrecord.py): what a relay
signs reads back, and every way a stranger could make a node believe a peer relays (or
make a record unreadable) is refused."""

from __future__ import annotations

import time

import cbor2
import nacl.signing
import pytest

from fluidfs.peers.address import PeerAddr
from fluidfs.peers.addrrecord import (
    SIG_CONTEXT_RELAY,
    SIG_CONTEXT_VIA,
    RecordError,
    make_record,
    read_record,
)

HERE = [PeerAddr.parse("198.51.100.7:7470")]


def test_a_relay_record_reads_back_and_others_do_not_say_relay() -> None:
    key = nacl.signing.SigningKey.generate()
    record = read_record(make_record(key, HERE, relay=True).raw)
    assert record.relay and list(record.addrs) == HERE
    assert not read_record(make_record(key, HERE).raw).relay
    with_via = make_record(key, HERE, via=[PeerAddr.parse("198.51.100.9:7470")], relay=True)
    assert read_record(with_via.raw).relay and len(read_record(with_via.raw).via) == 1
    with pytest.raises(ValueError):
        make_record(key, [], via=HERE, relay=True)  # a relay nobody can dial


def _signed(key: nacl.signing.SigningKey, version: int, context: bytes, signed: list,
            **body) -> bytes:
    pub = bytes(key.verify_key)
    when = int(time.time() * 1000)
    sig = key.sign(context + cbor2.dumps([version, pub, when, *signed])).signature
    return cbor2.dumps({"v": version, "id": pub, "time": when, "sig": sig, **body})


def test_hostile_relay_records_are_refused() -> None:
    key = nacl.signing.SigningKey.generate()
    addrs = [str(a) for a in HERE]
    honest_v2 = make_record(key, HERE, via=[PeerAddr.parse("198.51.100.9:7470")])
    body = cbor2.loads(honest_v2.raw)
    # someone adds "relay" to a record the peer signed without it
    for forged in ({**body, "relay": True}, {**body, "v": 3, "relay": True}):
        with pytest.raises(RecordError):
            read_record(cbor2.dumps(forged))
    bad = [
        # version 3 signed as such but saying relay false, or not saying it at all
        _signed(key, 3, SIG_CONTEXT_RELAY, [addrs, [], True], addrs=addrs, relay=False),
        _signed(key, 3, SIG_CONTEXT_RELAY, [addrs, [], True], addrs=addrs),
        # a relay with no address of its own
        _signed(key, 3, SIG_CONTEXT_RELAY, [[], ["198.51.100.9:7470"], True], addrs=[],
                via=["198.51.100.9:7470"], relay=True),
        # relay as something else than a bool
        _signed(key, 3, SIG_CONTEXT_RELAY, [addrs, [], True], addrs=addrs, relay=1),
        # four places in all
        _signed(key, 3, SIG_CONTEXT_RELAY,
                [addrs * 2, ["198.51.100.9:1", "198.51.100.9:2"], True],
                addrs=addrs * 2, via=["198.51.100.9:1", "198.51.100.9:2"], relay=True),
        # a version 2 signature presented as version 3
        _signed(key, 2, SIG_CONTEXT_VIA, [addrs, ["198.51.100.9:7470"]], addrs=addrs,
                via=["198.51.100.9:7470"], relay=True),
    ]
    for raw in bad:
        with pytest.raises(RecordError):
            read_record(raw)
    other = nacl.signing.SigningKey.generate()
    with pytest.raises(RecordError):  # a relay record presented as another identity's
        read_record(make_record(key, HERE, relay=True).raw, expected=bytes(other.verify_key))
