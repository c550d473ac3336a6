"""Signed per-owner records (peers/rootrecord.py), as written, checked and kept by peers."""

from __future__ import annotations

import os
from pathlib import Path

import cbor2
import pytest
import trio

from fluidfs import keys
from fluidfs.net.errors import RpcError
from fluidfs.peers import rootrecord
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.lease import LeaseInfo
from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.rootrecord import RecordError, open_record, parse, seal
from fluidfs.service.host import PeerService
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore
from fluidfs.wire import SchemaError

ME = keys.KeyRing(keys.generate())
OTHER = keys.KeyRing(keys.generate())
BODY = {"time": 123, "machine": b"m" * 16, "commit": b"pointer", "peers": [[b"k" * 32, "h:1"]]}


def test_round_trip() -> None:
    raw = seal(ME, "root", 7, BODY)
    env = parse(raw)
    assert (env.kind, env.owner, env.seq) == ("root", ME.public_key, 7)
    assert env.signed_ok()
    seq, body = open_record(ME, raw, "root")
    assert seq == 7 and body == BODY | {"kind": "root", "seq": 7}
    assert b"pointer" not in raw, "the body is encrypted"


def _reseal(raw: bytes, **changes) -> bytes:
    data = cbor2.loads(raw) | changes
    return cbor2.dumps(data)


def test_tampering_is_detected() -> None:
    raw = seal(ME, "root", 7, BODY)
    env = cbor2.loads(raw)
    box = bytearray(env["box"])
    box[-1] ^= 1
    cases = {
        "seq raised": _reseal(raw, seq=8),
        "box changed": _reseal(raw, box=bytes(box)),
        "signature forged": _reseal(raw, sig=os.urandom(64)),
        "kind swapped": _reseal(raw, kind="lease"),
        "fence raised": _reseal(raw, fence=5),
    }
    for what, bad in cases.items():
        with pytest.raises(RecordError):
            open_record(ME, bad, parse(bad).kind)
        assert not parse(bad).signed_ok(), what


def test_other_owners_and_kinds_are_refused() -> None:
    theirs = seal(OTHER, "root", 9, BODY)
    with pytest.raises(RecordError, match="another owner"):
        open_record(ME, theirs, "root")
    # a record signed by its owner but encrypted with someone else's metadata key
    mixed = keys.KeyRing(keys.generate())
    mixed.signing_key, mixed.public_key = ME.signing_key, ME.public_key
    with pytest.raises(RecordError, match="decrypt"):
        open_record(ME, seal(mixed, "root", 9, BODY), "root")
    with pytest.raises(RecordError, match="expected a lease"):
        open_record(ME, seal(ME, "root", 9, BODY), "lease")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 70_000,
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({"v": 1}),
        cbor2.dumps({"v": 2, "kind": "root", "owner": b"o" * 32, "seq": 1, "box": b"b" * 40,
                     "sig": b"s" * 64}),
        cbor2.dumps({"v": 1, "kind": "x", "owner": b"o" * 32, "seq": 1, "box": b"b" * 40,
                     "sig": b"s" * 64}),
        cbor2.dumps({"v": 1, "kind": "root", "owner": b"o" * 31, "seq": 1, "box": b"b" * 40,
                     "sig": b"s" * 64}),
        cbor2.dumps({"v": 1, "kind": "root", "owner": b"o" * 32, "seq": -1, "box": b"b" * 40,
                     "sig": b"s" * 64}),
    ],
)
def test_malformed_envelopes(raw: bytes) -> None:
    with pytest.raises(RecordError):
        parse(raw)


def test_lease_info_is_strict_and_expires() -> None:
    body = {"kind": "lease", "seq": 3, "machine": b"x", "host": "h", "mount": "/m", "pid": 5,
            "addr": "", "time": 1_000 * 10**9, "ttl": 60, "state": "held", "v": 2,
            "bound_ms": 60_000, "holders": [b"k" * 32]}
    info = LeaseInfo.of(3, body)
    assert info.live(1_030) and not info.live(1_061)
    assert info.where() == "host h at /m (pid 5)"
    assert LeaseInfo.of(3, {**body, "later": "ignored"}) == info
    with pytest.raises(SchemaError, match=r"lease\.host: expected str"):
        LeaseInfo.of(4, {**body, "host": 7})
    with pytest.raises(SchemaError, match="missing key 'state'"):
        LeaseInfo.of(4, {k: v for k, v in body.items() if k != "state"})


# --- the peer side ------------------------------------------------------------------------


def _service(root: Path, records: RecordStore | None) -> tuple[PeerService, Ledger, list]:
    db = Database(root / "meta", META_TABLES)
    shards = ShardStore(root / "shards")
    ledger = Ledger(db)
    peers = PeerList(db, os.urandom(32))
    svc = PeerService(shards, ledger, peers, donate=1 << 30, ratio=1.5,
                      limiter=trio.CapacityLimiter(2), records=records,
                      on_end=lambda _key: None)
    return svc, ledger, [db, shards]


@pytest.fixture
def service(tmp_path: Path):
    svc, ledger, stores = _service(tmp_path, RecordStore(tmp_path / "records"))
    ledger.record(ME.public_key, we_host=1 << 20, they_host=1 << 20, term=3600)
    yield svc
    for store in stores:
        store.close()


def _op(service: PeerService, op: str):
    """The service's answer to *op*, as a function of (caller key, args)."""
    return lambda peer, args: service.handle(peer, op, args)


async def expect_code(code: str, coro) -> None:
    with pytest.raises(RpcError) as info:
        await coro
    assert info.value.code == code


async def test_peer_keeps_the_highest_valid_record(service, tmp_path: Path) -> None:
    put, get = _op(service, "PutRecord"), _op(service, "GetRecord")
    await expect_code("not_found", get(ME.public_key, {"kind": "root"}))
    assert await put(ME.public_key, {"record": seal(ME, "root", 5, BODY)}) == {
        "stored": True, "seq": 5}
    assert await put(ME.public_key, {"record": seal(ME, "root", 4, BODY)}) == {
        "stored": False, "seq": 5}
    assert await put(ME.public_key, {"record": seal(ME, "root", 5, BODY)}) == {
        "stored": False, "seq": 5}, "the same seq with other contents is refused"
    newer = seal(ME, "root", 6, BODY)
    assert (await put(ME.public_key, {"record": newer}))["stored"]
    assert (await put(ME.public_key, {"record": newer}))["stored"], "idempotent"
    assert (await get(ME.public_key, {"kind": "root"}))["record"] == newer
    await expect_code("not_found", get(ME.public_key, {"kind": "lease"}))
    await expect_code("not_found", get(OTHER.public_key, {"kind": "root"}))
    await expect_code("not_found", get(ME.public_key, {"kind": "../../etc"}))
    lease = seal(ME, "lease", 1, {"state": "held"})
    assert (await put(ME.public_key, {"record": lease}))["stored"]
    files = sorted(p.name for p in (tmp_path / "records").iterdir())
    assert files == [f"{ME.public_key.hex()}.lease", f"{ME.public_key.hex()}.root"]


async def test_peer_refuses_bad_and_foreign_records(service, tmp_path: Path) -> None:
    put = _op(service, "PutRecord")
    await expect_code("bad_request", put(ME.public_key, {"record": b"junk"}))
    await expect_code("bad_request", put(ME.public_key, {"record": seal(OTHER, "root", 1, {})}))
    forged = _reseal(seal(ME, "root", 1, BODY), sig=os.urandom(64))
    await expect_code("bad_request", put(ME.public_key, {"record": forged}))
    await expect_code("no_agreement", put(OTHER.public_key, {"record": seal(OTHER, "root", 1, {})}))
    keeps_none, ledger, stores = _service(tmp_path / "no-records", None)
    ledger.record(ME.public_key, we_host=1 << 20, they_host=1 << 20, term=3600)
    put = _op(keeps_none, "PutRecord")
    await expect_code("refused", put(ME.public_key, {"record": seal(ME, "root", 1, {})}))
    for store in stores:
        store.close()


def test_record_store_replaces_atomically(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "r")
    owner = os.urandom(32)
    assert store.get(owner, "root") is None
    store.put(owner, "root", b"one")
    store.put(owner, "root", b"two")
    assert store.get(owner, "root") == b"two"
    assert [p.name for p in (tmp_path / "r").iterdir()] == [f"{owner.hex()}.root"]
    with pytest.raises(ValueError):
        store.path(owner, "../x")
    assert rootrecord.MAX_RECORD == 64 * 1024
