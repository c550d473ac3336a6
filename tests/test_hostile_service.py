"""A stranger against a real `fluidfs serve`: what it can make the node store or compute.

Each test plays one attack with direct RPC (``open_rpc``) and checks what a user of the
node would see: it stays up, its memory and the bytes it keeps stay within their limits,
and numbers the stranger reports are not believed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import cbor2
import nacl.signing
import pytest
import trio
from conftest import run_cli
from peerhelpers import Peer, endpoint, random_shard, status, wait_for

from fluidfs import keys
from fluidfs.net.errors import RpcError
from fluidfs.net.tcp import open_rpc, serve_tcp
from fluidfs.peers import rootrecord
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.host import PeerService
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

MIB = 1024 * 1024
TERMS = {"offer": MIB, "ask": MIB, "term": 3600}


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    p = Peer(tmp_path_factory.mktemp("hostile"), "server", donate="64M").start()
    yield p
    p.kill()


shard = random_shard


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def peer_id(key: nacl.signing.SigningKey) -> str:
    return keys.encode_peer_id(key.verify_key.encode())


async def expect_code(code: str, coro) -> None:
    with pytest.raises(RpcError) as info:
        await coro
    assert info.value.code == code, info.value


async def test_one_id_listed_1024_times_is_read_once(peer):
    """DeleteShard with one stored id repeated: once read 1,024 copies (256 MiB here)."""
    me = nacl.signing.SigningKey.generate()
    one = shard(256 * 1024)
    async with open_rpc(*endpoint(peer), me) as conn:
        assert (await conn.call("ProposeAgreement", TERMS))["accepted"]
        assert (await conn.call("StoreShard", {"shards": [one]}))["stored"] == [one["id"]]
        before = peak_rss(peer.proc.pid)
        reply = await conn.call("DeleteShard", {"ids": [one["id"]] * 1024}, timeout=60)
        grown = peak_rss(peer.proc.pid) - before
        assert grown < 32 * MIB, f"peak memory grew by {grown // MIB} MiB"
        assert reply == {"deleted": 1}
        await expect_code("not_found", conn.call("RetrieveShard", {"id": one["id"]}))
    assert peer.hosted_for(peer_id(me)) == 0


async def test_concurrent_stores_never_exceed_the_quota(peer):
    """Many StoreShard calls at once over several connections of one identity: together
    they once passed the quota check before any of them wrote (up to 32 MiB on 1 MiB)."""
    me = nacl.signing.SigningKey.generate()
    stored: list[int] = []

    async def hammer(conn) -> None:
        async def one() -> None:
            batch = [shard(128 * 1024) for _ in range(8)]  # each call alone fits the quota
            sizes = {s["id"]: len(s["data"]) for s in batch}
            reply = await conn.call("StoreShard", {"shards": batch}, timeout=60)
            stored.extend(sizes[sid] for sid in reply["stored"])
            assert all(r["code"] == "over_quota" for r in reply["refused"])

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)

    async with open_rpc(*endpoint(peer), me) as first:
        assert (await first.call("ProposeAgreement", TERMS))["accepted"]
        async with open_rpc(*endpoint(peer), me) as second, \
                open_rpc(*endpoint(peer), me) as third, \
                open_rpc(*endpoint(peer), me) as fourth, trio.open_nursery() as nursery:
            for conn in (first, second, third, fourth):
                nursery.start_soon(hammer, conn)
    assert 0 < sum(stored) <= MIB, f"{sum(stored)} bytes stored on a {MIB} byte quota"
    assert peer.hosted_for(peer_id(me)) == sum(stored) <= MIB


async def test_agreements_have_minimum_and_maximum_terms(peer):
    """An agreement for nothing was granted to anyone (and unlocked record storage); a
    stranger's large request is granted only a small share of the donation."""
    me = nacl.signing.SigningKey.generate()
    record = rootrecord.seal(_keyring(me), "root", 1, {"time": 1})
    async with open_rpc(*endpoint(peer), me) as conn:
        free = await conn.call("ProposeAgreement", {"offer": 0, "ask": 0, "term": 3600})
        assert not free["accepted"] and "minimum" in free["reason"]
        await expect_code("no_agreement", conn.call("PutRecord", {"record": record}))
        await expect_code("no_agreement", conn.call("StoreShard", {"shards": [shard(100)]}))
        big = await conn.call("ProposeAgreement", {"offer": 32 * MIB, "ask": 32 * MIB,
                                                   "term": 3600})
        # A newcomer gets at most 1/16 of the 64 MiB donation, at the ratio it proposed.
        assert big["accepted"] and big["ask"] == 4 * MIB and big["offer"] == 4 * MIB, big
        batch = [shard(MIB) for _ in range(5)]
        reply = await conn.call("StoreShard", {"shards": batch})
        assert len(reply["stored"]) == 4 and reply["refused"][0]["code"] == "over_quota"
    rows = {r["id"]: r for r in peer.control("peers", "--json")["peers"]}
    assert rows[peer_id(me)]["we_host"] == 4 * MIB


async def test_records_need_a_live_agreement_and_a_sane_seq(peer):
    me = nacl.signing.SigningKey.generate()
    ring = _keyring(me)
    async with open_rpc(*endpoint(peer), me) as conn:
        assert (await conn.call("ProposeAgreement", TERMS))["accepted"]
        await expect_code("bad_request", conn.call("PutRecord", {"record": _raw_seq(ring)}))
        ok = rootrecord.seal(ring, "root", 5, {"time": 1})
        assert await conn.call("PutRecord", {"record": ok}) == {"stored": True, "seq": 5}
        assert (await conn.call("EndAgreement", {}))["ended"]
        newer = rootrecord.seal(ring, "root", 6, {"time": 1})
        await expect_code("no_agreement", conn.call("PutRecord", {"record": newer}))


def _keyring(signing: nacl.signing.SigningKey) -> keys.KeyRing:
    ring = keys.KeyRing(keys.generate())
    ring.signing_key, ring.public_key = signing, signing.verify_key.encode()
    return ring


def _raw_seq(ring: keys.KeyRing, seq: int = 2**63) -> bytes:
    """A well-signed record whose seq no honest owner reaches (seal() would refuse it)."""
    header = cbor2.dumps([1, "root", ring.public_key, seq])  # version 1: no fence
    box = os.urandom(rootrecord.NONCE_SIZE + 32)
    sig = ring.signing_key.sign(rootrecord.SIG_CONTEXTS[1] + header + box).signature
    return cbor2.dumps({"v": 1, "kind": "root", "owner": ring.public_key,
                        "seq": seq, "box": box, "sig": sig})


# --- a peer that reports a huge record seq --------------------------------------------------


class LyingRecords(PeerService):
    """A real peer service (real LMDB) whose PutRecord answer claims a seq near 2^64."""

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op == "PutRecord":
            return {"stored": False, "seq": 2**64 - 1}
        return await super().handle(peer_key, op, args)


def _service(root: Path, self_key: bytes) -> tuple[PeerService, list]:
    db = Database(root / "meta", META_TABLES)
    shards = ShardStore(root / "shards")
    svc = LyingRecords(shards, Ledger(db), PeerList(db, self_key), donate=1 << 30, ratio=1.5,
                       limiter=trio.CapacityLimiter(2), records=RecordStore(root / "records"),
                       on_end=lambda _key: None)
    return svc, [db, shards]


async def test_publish_believes_no_seq_a_peer_reports(tmp_path: Path):
    me = keys.KeyRing(keys.generate())
    liar_key = nacl.signing.SigningKey.generate()
    svc, stores = _service(tmp_path / "liar", liar_key.verify_key.encode())
    peers = PeerList(Database(tmp_path / "me", META_TABLES), me.public_key)
    conns = Connections(me.signing_key, svc, peers)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_tcp, "127.0.0.1", 0, liar_key, svc)
        await nursery.start(conns.run)
        conn = await conns.connect(f"127.0.0.1:{port}")
        peers.add(conn.peer_key, f"127.0.0.1:{port}")
        client = rootrecord.RecordClient(me, conns, peers)
        assert await client.publish("root", 3, {"time": 1}) == 0
        assert client.highest.get("root", 0) <= 3, client.highest
        nursery.cancel_scope.cancel()
    for store in stores:
        store.close()


class LiarThread:
    """The lying peer, served from a thread of the test process on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.identity = nacl.signing.SigningKey.generate()
        self.svc, self.stores = _service(root, self.identity.verify_key.encode())
        self.port = 0
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(serve_tcp, "127.0.0.1", 0, self.identity,
                                                self.svc)
                self._ready.set()

    def __enter__(self) -> LiarThread:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        assert self._token is not None and self._scope is not None
        self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(10)
        for store in self.stores:
            store.close()


def test_a_mount_keeps_committing_past_a_peer_reporting_a_huge_seq(make_mount, tmp_path):
    """A PutRecord reply {stored: false, seq: 2^64-1} once became the next commit's floor:
    the commit after it overflowed a u64 and the mount went away."""
    key = tmp_path / "small.key"
    keys.write_keyfile(key, keys.generate(shards_total=2, shards_needed=1))
    honest = Peer(tmp_path, "honest", donate="256M").start()
    try:
        with LiarThread(tmp_path / "liar") as liar:
            mnt = make_mount("m", key=key, extra=[
                "--listen", "127.0.0.1:0", "--donate", "256M", "--block-size", "256K",
                "--peer", honest.addr, "--peer", f"127.0.0.1:{liar.port}"])
            mnt.mount()
            wait_for(lambda: status(mnt.state)["peers_with_agreements"] == 2, 30,
                     "agreements with both peers")
            seqs = []
            for name in ("a", "b", "c"):
                (mnt.path / name).write_bytes(os.urandom(300_000))
                result = run_cli("sync", "--json", "--state-dir", str(mnt.state), timeout=120)
                assert result.returncode == 0, result.stdout + result.stderr + mnt.log()
                seqs.append(status(mnt.state)["commit"]["head_seq"])
            assert seqs == sorted(seqs) and seqs[-1] < 100, seqs
            assert all((mnt.path / n).stat().st_size == 300_000 for n in "abc"), mnt.log()
            assert "Traceback" not in (mnt.state / "fluidfs.log").read_text(), mnt.log()
            mnt.unmount()
    finally:
        honest.kill()
