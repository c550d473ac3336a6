"""A stateful property test: random sequences of schema-valid but adversarial calls.

Hypothesis drives several attacker identities against a live `fluidfs serve` node that
also hosts an honest owner's shards (a real mount whose keyfile needs every one of its
three shards, N = K = 3, so a single shard the node loses or spoils shows). Each step is
one hostile call — proposals with extreme terms, stores past the quota, concurrent stores,
duplicated deletes, other owners' ids, audits out of range, records with huge or forged
sequence numbers, junk addresses, ended agreements — and after every step the invariants
must hold:

- the node is up and still answers a stranger's Ping;
- every shard the node said it stored for an attacker comes back byte for byte until
  that attacker deletes it, and nothing it refused is there;
- an attacker never has more stored than the largest quota it was granted;
- terms the node grants are never more than what was proposed.

At the end `fluidfs check --read-data` passes for the honest owner (every block rebuilt
from its three shards, one of them on the attacked node).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading

import cbor2
import nacl.signing
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from peerhelpers import Peer, status, wait_for

from fluidfs import keys
from fluidfs.blocks import merkle
from fluidfs.net.errors import NetError, RpcError
from fluidfs.net.rpc import RpcConnection
from fluidfs.net.tcp import dial
from fluidfs.peers import rootrecord

KIB = 1024
MIB = 1024 * KIB
ATTACKERS = 3
NUMBERS = st.one_of(
    st.sampled_from([0, 1, 4 * KIB, MIB, 4 * MIB, 64 * MIB, 2**63 - 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
ADDRESSES = st.one_of(
    st.sampled_from(["x", ":", "127.0.0.1:0", "127.0.0.1:99999", "[::1]:7", "a" * 300,
                     "0.0.0.0:1", "host:port", "-1:1", "127.0.0.1:7470"]),
    st.text(max_size=300),
)


class Portal:
    """A trio loop in a background thread, with a nursery for connection tasks."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn, *args):
        """Run ``await fn(*args)`` on the portal's loop; return its result."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


class Attacker:
    """One hostile identity with one RPC connection (re-dialled when the node closes it)."""

    def __init__(self, portal: Portal, addr: str) -> None:
        self.key = nacl.signing.SigningKey.generate()
        self.public = bytes(self.key.verify_key)
        self.portal = portal
        self.host, port = addr.rsplit(":", 1)
        self.port = int(port)
        self.conn: RpcConnection | None = None

    async def call(self, op: str, args: dict, timeout: float = 20) -> dict:
        if self.conn is None or self.conn.closed:
            channel = await dial(self.host, self.port, self.key, timeout=10)
            self.conn = RpcConnection(channel)
            await self.portal.nursery.start(self.conn.run)
        return await self.conn.call(op, args, timeout=timeout)


async def _outcome(coro) -> tuple[str, object]:
    """('ok', reply) or ('err', code); a lost connection counts as a refusal, not a crash."""
    try:
        return "ok", await coro
    except RpcError as exc:
        return "err", exc.code
    except NetError as exc:
        return "err", type(exc).__name__


def _shard(size: int) -> tuple[bytes, bytes]:
    data = os.urandom(size)
    return merkle.shard_id(data), data


def _record(key: nacl.signing.SigningKey, seq: int) -> bytes:
    """A record signed by *key* (its box is opaque to the node, so random bytes do)."""
    owner = bytes(key.verify_key)
    header = cbor2.dumps([1, "root", owner, seq])  # a version 1 record: no fence
    box = os.urandom(64)
    sig = key.sign(rootrecord.SIG_CONTEXTS[1] + header + box).signature
    return cbor2.dumps({"v": 1, "kind": "root", "owner": owner, "seq": seq,
                        "box": box, "sig": sig})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One attacked `fluidfs serve` (p0) plus two more peers, and an honest N=K=3 mount."""
    from conftest import Mount, require_fuse

    require_fuse()
    root = tmp_path_factory.mktemp("stateful")
    peers = [Peer(root, f"p{i}", donate="256M") for i in range(3)]
    keyfile = root / "owner.key"
    keys.write_keyfile(keyfile, keys.generate(3, 3))
    mnt = Mount(root / "mnt", root / "state", keyfile)
    mnt.path.mkdir()
    try:
        for p in peers:
            p.start()
        mnt.extra = ["--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "1G"]
        for p in peers:
            mnt.extra += ["--peer", p.addr]
        mnt.mount()
        wait_for(lambda: status(mnt.state)["peers_with_agreements"] == 3, 60, "agreements")
        (mnt.path / "honest.bin").write_bytes(os.urandom(6 * 256 * KIB + 123))
        (mnt.path / "small.txt").write_bytes(b"kept safe")
        wait_for(lambda: status(mnt.state)["under_replicated"] == 0
                 and status(mnt.state)["unsealed_bytes"] == 0
                 and status(mnt.state).get("upload_pending_bytes", 0) == 0, 60,
                 "full redundancy")
        yield peers, mnt
    finally:
        mnt.cleanup()
        for p in peers:
            p.kill()


class HostileCalls(RuleBasedStateMachine):
    """Adversarial calls against the attacked node; invariants checked after each."""

    target: Peer
    portal: Portal

    @initialize()
    def setup(self) -> None:
        self.attackers = [Attacker(self.portal, self.target.addr) for _ in range(ATTACKERS)]
        self.stored: list[dict[bytes, bytes]] = [{} for _ in self.attackers]
        self.quota = [0] * ATTACKERS

    def _run(self, coro_fn, *args):
        return self.portal.run(coro_fn, *args)

    def _call(self, who: int, op: str, args: dict) -> tuple[str, object]:
        return self._run(_outcome, self.attackers[who].call(op, args))

    # --- agreements ----------------------------------------------------------------------

    @rule(who=st.integers(0, ATTACKERS - 1), offer=NUMBERS, ask=NUMBERS, term=NUMBERS,
          addr=st.none() | ADDRESSES)
    def propose(self, who, offer, ask, term, addr) -> None:
        args = {"offer": offer, "ask": ask, "term": term}
        if addr is not None:
            args["addr"] = addr
        kind, reply = self._call(who, "ProposeAgreement", args)
        if kind == "ok" and reply["accepted"]:
            assert reply["ask"] <= ask, "granted more than was asked"
            self.quota[who] = max(self.quota[who], reply["ask"])

    @rule(who=st.integers(0, ATTACKERS - 1))
    def end_agreement(self, who) -> None:
        self._call(who, "EndAgreement", {})

    # --- shards --------------------------------------------------------------------------

    @rule(who=st.integers(0, ATTACKERS - 1),
          sizes=st.lists(st.integers(1, 96 * KIB), min_size=1, max_size=6),
          spoil=st.lists(st.booleans(), min_size=6, max_size=6),
          repeat=st.integers(1, 3))
    def store(self, who, sizes, spoil, repeat) -> None:
        shards, honest = [], {}
        for size, bad in zip(sizes, spoil, strict=False):
            sid, data = _shard(size)
            if bad:
                shards.append({"id": sid, "data": data[:-1] + bytes([data[-1] ^ 1])})
            else:
                shards.append({"id": sid, "data": data})
                honest[sid] = data
        kind, reply = self._call(who, "StoreShard", {"shards": shards * repeat})
        if kind == "ok":
            for sid in reply["stored"]:
                assert sid in honest, "a shard whose bytes do not match its id was stored"
                self.stored[who][sid] = honest[sid]

    @rule(who=st.integers(0, ATTACKERS - 1), calls=st.integers(2, 16))
    def concurrent_stores(self, who, calls) -> None:
        batches = [[_shard(200 * KIB)] for _ in range(calls)]

        async def all_at_once() -> list:
            results: list = []

            async def one(batch) -> None:
                sid, data = batch[0]
                kind, reply = await _outcome(
                    self.attackers[who].call("StoreShard", {"shards": [{"id": sid,
                                                                         "data": data}]}))
                if kind == "ok" and reply["stored"]:
                    results.append((sid, data))

            async with trio.open_nursery() as nursery:
                for batch in batches:
                    nursery.start_soon(one, batch)
            return results

        for sid, data in self._run(all_at_once):
            self.stored[who][sid] = data

    @rule(who=st.integers(0, ATTACKERS - 1), times=st.integers(1, 1024),
          foreign=st.booleans(), data=st.data())
    def delete(self, who, times, foreign, data) -> None:
        mine = sorted(self.stored[who])
        if foreign:
            others = [sid for i, s in enumerate(self.stored) if i != who for sid in s]
            ids = [data.draw(st.sampled_from(others))] if others else [os.urandom(32)]
        elif mine:
            ids = [data.draw(st.sampled_from(mine))]
        else:
            ids = [os.urandom(32)]
        kind, reply = self._call(who, "DeleteShard", {"ids": (ids * times)[:1024]})
        if kind == "ok":
            assert reply["deleted"] <= 1, "one id listed many times was deleted many times"
            if not foreign:
                for sid in ids:
                    self.stored[who].pop(sid, None)

    @precondition(lambda self: any(self.stored))
    @rule(who=st.integers(0, ATTACKERS - 1), data=st.data())
    def retrieve_foreign(self, who, data) -> None:
        others = [sid for i, s in enumerate(self.stored) if i != who for sid in s
                  if sid not in self.stored[who]]
        if not others:
            return
        sid = data.draw(st.sampled_from(others))
        kind, _reply = self._call(who, "RetrieveShard", {"id": sid})
        assert kind == "err", "another owner's shard was served"

    @rule(who=st.integers(0, ATTACKERS - 1), leaf=NUMBERS, data=st.data())
    def audit(self, who, leaf, data) -> None:
        mine = sorted(self.stored[who])
        sid = data.draw(st.sampled_from(mine)) if mine else os.urandom(32)
        self._call(who, "AuditShard", {"id": sid, "leaf": leaf, "nonce": os.urandom(32)})

    # --- records, discovery --------------------------------------------------------------

    @rule(who=st.integers(0, ATTACKERS - 1), seq=NUMBERS, forge=st.booleans())
    def put_record(self, who, seq, forge) -> None:
        signer = self.attackers[(who + 1) % ATTACKERS].key if forge else self.attackers[who].key
        kind, reply = self._call(who, "PutRecord", {"record": _record(signer, seq)})
        if forge:
            assert kind == "err", "a record of another owner was accepted"
        if kind == "ok":
            assert reply["seq"] < 2**64

    @rule(who=st.integers(0, ATTACKERS - 1), addr=ADDRESSES)
    def ping(self, who, addr) -> None:
        self._call(who, "Ping", {"addr": addr})

    @rule(who=st.integers(0, ATTACKERS - 1), most=st.integers(0, 256))
    def share(self, who, most) -> None:
        kind, reply = self._call(who, "ShareNewPeers", {"max": most})
        if kind == "ok":
            assert len(reply["peers"]) <= most

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def node_is_up(self) -> None:
        assert self.target.proc.poll() is None, "the attacked node died:\n" + self.target.log()
        stranger = Attacker(self.portal, self.target.addr)
        kind, reply = self._run(_outcome, stranger.call("Ping", {}))
        assert kind == "ok", f"a stranger's Ping failed: {reply}"
        if stranger.conn is not None:
            self._run(stranger.conn.aclose)

    @invariant()
    def stored_shards_come_back_within_quota(self) -> None:
        for who, shards in enumerate(getattr(self, "stored", [])):
            assert sum(map(len, shards.values())) <= self.quota[who], "stored past the quota"
            for sid, data in shards.items():
                kind, reply = self._call(who, "RetrieveShard", {"id": sid})
                assert kind == "ok" and reply["data"] == data, f"stored shard lost: {reply}"

    def teardown(self) -> None:
        for attacker in getattr(self, "attackers", []):
            if attacker.conn is not None:
                with contextlib.suppress(Exception):
                    self._run(attacker.conn.aclose)


def test_adversarial_call_sequences_leave_the_node_up_and_the_owner_whole(world):
    peers, mnt = world
    portal = Portal()
    try:
        HostileCalls.target = peers[0]
        HostileCalls.portal = portal
        machine = HostileCalls.TestCase
        machine.settings = settings(
            max_examples=12,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=False,
        )
        machine().runTest()
    finally:
        portal.close()
    assert peers[0].proc.poll() is None
    mnt.unmount()
    shutil.rmtree(mnt.state / "cache", ignore_errors=True)
    mnt.mount()
    check = _cli("check", "--read-data", "--state-dir", str(mnt.state))
    assert check.returncode == 0, check.stdout + check.stderr + mnt.log()
    assert "0 unrecoverable" in check.stdout
    assert (mnt.path / "small.txt").read_bytes() == b"kept safe"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluidfs", *args], capture_output=True,
                          text=True, timeout=300)
