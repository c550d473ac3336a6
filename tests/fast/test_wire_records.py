"""Signed records read through fluidfs.wire: a lease whose body does not fit is
unreadable, never a lease with made-up defaults (which once read as "released")."""

from __future__ import annotations

import time
from pathlib import Path

import cbor2
import pytest
from inproc import PeerNode, peer_nodes, slow_jump_clock

from fluidfs import keys
from fluidfs.peers.lease import LeaseHeld, LeaseInfo, WriterLease
from fluidfs.peers.rootrecord import RecordClient, RecordError, parse, seal
from fluidfs.wire import SchemaError

BODY = {"kind": "lease", "seq": 3, "time": 1_000 * 10**9, "machine": b"m" * 16, "host": "h",
        "mount": "/m", "pid": 5, "addr": "127.0.0.1:1", "ttl": 60, "state": "held", "v": 2,
        "bound_ms": 60_000, "holders": [b"k" * 32]}


@pytest.mark.parametrize(
    "broken",
    [
        {k: v for k, v in BODY.items() if k != "state"},
        {k: v for k, v in BODY.items() if k != "ttl"},
        {**BODY, "time": "soon"},
        {**BODY, "host": 7},
        {**BODY, "pid": -1},
        {**BODY, "state": "maybe"},
        {**BODY, "machine": b""},
        {k: v for k, v in BODY.items() if k != "v"},  # a version 1 body
        {**BODY, "v": 3},
        {k: v for k, v in BODY.items() if k != "holders"},
        {**BODY, "holders": []},
        {**BODY, "holders": [b"short"]},
        {**BODY, "holders": [b"k" * 32] * 65},
        {**BODY, "bound_ms": -1},
        {**BODY, "state": "handover", "by_machine": 3},
    ],
)
def test_lease_info_refuses_missing_and_mistyped_fields(broken: dict) -> None:
    assert LeaseInfo.of(3, BODY).live(1_030)
    with pytest.raises(SchemaError):
        LeaseInfo.of(3, broken)


async def test_an_unreadable_lease_refuses_the_mount_until_takeover(
    tmp_path: Path, clock
) -> None:
    """With --takeover it is asked to hand over and then waited out like a silent holder
    (seq 6 the request, 7 ours), on virtual time."""
    ring = keys.KeyRing(keys.generate())
    async with peer_nodes(tmp_path, 3) as (nursery, hosts):
        node = await PeerNode(tmp_path / "a", ring).start(nursery, listen=False)
        try:
            for host in hosts:
                node.use(host)
            client = RecordClient(ring, node.conns, node.peers)
            # a live lease of another machine, lacking its ttl and mount point
            odd = {"time": time.time_ns(), "machine": b"b" * 16, "host": "b", "state": "held"}
            assert await client.publish("lease", 5, odd) == 3
            lease = WriterLease(client, b"a" * 16, "/mnt/a", renew=1.0)
            with pytest.raises(LeaseHeld, match=r"seq 5\) cannot be read.*--takeover"):
                await lease.acquire(takeover=False)
            await lease.acquire(takeover=True)
            held = await lease.current()
            assert (held.seq, held.machine, held.state) == (7, b"a" * 16, "held")
        finally:
            nursery.cancel_scope.cancel()
            node.close()


@pytest.fixture
def clock():
    return slow_jump_clock()


def test_record_envelopes_are_checked_by_schema() -> None:
    ring = keys.KeyRing(keys.generate())
    raw = seal(ring, "lease", 7, BODY)
    assert parse(raw).seq == 7
    fields = cbor2.loads(raw)
    for bad in ({**fields, "extra": 1}, {**fields, "seq": 2**63}, {**fields, "sig": "s" * 64},
                {k: v for k, v in fields.items() if k != "box"},
                {k: v for k, v in fields.items() if k != "fence"},  # v2 without its fence
                {**fields, "v": 1},  # v1 with a fence
                {**fields, "fence": -1}, {**fields, "fence": 2**63}, {**fields, "fence": "1"},
                {**fields, "v": 3}):
        with pytest.raises(RecordError, match="malformed record"):
            parse(cbor2.dumps(bad))
    with pytest.raises(RecordError, match=r"too many CBOR items|nesting"):
        parse(cbor2.dumps({**fields, "extra": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}))
