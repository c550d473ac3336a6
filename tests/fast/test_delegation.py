"""Repair delegations (issue 13 item 4, part 1): a holder answers a user's provider as if
it were the user, and only when the user's signed delegation says so.

Real parts in-process: U (the user, never listening), H (one of U's holders) and P (U's
provider) are ``PeerNode``s with real services, LMDB and loopback sockets.
"""

from __future__ import annotations

import os
import time

import nacl.signing
import pytest
import trio
from inproc import PeerNode
from providernet import run_net

from fluidfs.blocks import merkle
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import REQUEST_SCHEMAS
from fluidfs.peers.delegation import (
    DelegationError,
    read_delegation,
    sign_delegation,
)
from fluidfs.wire.schema import SchemaError, validate

ROOM = 1_000_000  # U's agreement with H


def shard(size: int = 200_000) -> tuple[bytes, bytes]:
    data = os.urandom(size)
    return merkle.shard_id(data), data


class Net:
    def __init__(self, tmp_path) -> None:
        self.u = PeerNode(tmp_path / "u")
        self.h = PeerNode(tmp_path / "h")
        self.p = PeerNode(tmp_path / "p")
        self.q = PeerNode(tmp_path / "q")  # someone else

    async def start(self, nursery: trio.Nursery) -> None:
        for node in (self.h, self.p, self.q):
            await node.start(nursery)
        await self.u.start(nursery, listen=False)
        self.u.use(self.h, ROOM)
        for node in (self.p, self.q):
            node.peers.add(self.h.key, self.h.addr)

    def close(self) -> None:
        for node in (self.u, self.h, self.p, self.q):
            node.close()


async def with_net(tmp_path, body) -> None:
    await run_net(Net(tmp_path), body)


async def test_a_provider_with_the_users_delegation_audits_reads_and_stores_as_the_user(
        tmp_path):
    """P audits and fetches U's shard at H and places a new one under U's agreement,
    counted against U's room and never beyond it. Fails before the delegation: H answers
    P for P's own shards only (not_found / no_agreement)."""

    async def body(net: Net) -> None:
        sid, data = shard()
        await net.u.conns.call(net.h.key, "StoreShard", {"shards": [{"id": sid, "data": data}]})
        grant = sign_delegation(net.u.keyring.signing_key, net.p.key).raw
        h = net.h.key

        # P audits first: its first delegated request gets a stranger's reply room.
        leaf = merkle.leaf_count(len(data)) - 1
        proof = await net.p.conns.call(h, "AuditShard", {"id": sid, "leaf": leaf,
                                                         "nonce": os.urandom(32),
                                                         "delegation": grant})
        assert merkle.verify(sid, len(data), leaf, proof["leaf_data"], proof["path"])
        got = await net.p.conns.call(h, "RetrieveShard", {"id": sid, "delegation": grant})
        assert got["data"] == data

        new_id, new = shard(600_000)
        reply = await net.p.conns.call(h, "StoreShard", {
            "shards": [{"id": new_id, "data": new}], "delegation": grant})
        assert reply == {"stored": [new_id], "refused": []}
        assert net.h.shards.get(net.u.key, new_id) == new  # under U's name ...
        assert net.h.shards.get(net.p.key, new_id) is None  # ... not P's
        # U reads it back as its own.
        assert (await net.u.conns.call(h, "RetrieveShard", {"id": new_id}))["data"] == new

        # U's room (1 MB) holds 800 KB: a delegated store beyond it is refused like U's.
        over_id, over = shard(300_000)
        reply = await net.p.conns.call(h, "StoreShard", {
            "shards": [{"id": over_id, "data": over}], "delegation": grant})
        assert reply == {"stored": [], "refused": [{"id": over_id, "code": "over_quota"}]}
        assert net.h.shards.get(net.u.key, over_id) is None

    await with_net(tmp_path, body)


async def test_a_holder_refuses_forged_expired_misdirected_and_strangers_delegations(
        tmp_path):
    """Each bad delegation is refused and nothing of U's is served or stored: a forged
    signature, an expired one, one naming another delegate, one from an owner H holds no
    agreement with, garbage bytes; and DeleteShard cannot be delegated at all."""

    async def body(net: Net) -> None:
        sid, data = shard()
        await net.u.conns.call(net.h.key, "StoreShard", {"shards": [{"id": sid, "data": data}]})
        h = net.h.key
        signer = net.u.keyring.signing_key
        good = sign_delegation(signer, net.p.key).raw

        forged = bytearray(good)
        forged[-1] ^= 1  # the last byte of the signature
        expired = sign_delegation(signer, net.p.key, until=time.time() - 1).raw
        for_q = sign_delegation(signer, net.q.key).raw  # P shows Q's delegation
        stranger = sign_delegation(nacl.signing.SigningKey.generate(), net.p.key).raw
        cases = {"bad signature": bytes(forged), "expired": expired,
                 "names someone else": for_q, "no agreement": stranger,
                 "delegation:": os.urandom(100)}
        for why, raw in cases.items():
            with pytest.raises(RpcError) as caught:
                await net.p.conns.call(h, "AuditShard", {"id": sid, "leaf": 0,
                                                         "nonce": os.urandom(32),
                                                         "delegation": raw})
            assert caught.value.code == "refused" and why in str(caught.value), why
            new_id, new = shard(1000)
            with pytest.raises(RpcError) as caught:
                await net.p.conns.call(h, "StoreShard", {
                    "shards": [{"id": new_id, "data": new}], "delegation": raw})
            assert caught.value.code == "refused", why
            assert net.h.shards.get(net.u.key, new_id) is None

        # Q holding P's genuine delegation is still not P.
        with pytest.raises(RpcError) as caught:
            await net.q.conns.call(h, "AuditShard", {"id": sid, "leaf": 0,
                                                     "nonce": os.urandom(32),
                                                     "delegation": good})
        assert caught.value.code == "refused"
        # Deletes are never delegated: the field is not in DeleteShard's schema.
        with pytest.raises(SchemaError):  # what the holder's dispatcher checks first
            validate(REQUEST_SCHEMAS["DeleteShard"], {"ids": [sid], "delegation": good})
        with pytest.raises(RpcError) as caught:  # nor sent to a provider for someone
            await net.p.conns.call(h, "RetrieveShard", {"id": sid, "delegation": good,
                                                        "for": net.u.key})
        assert caught.value.code in ("bad_request", "refused")
        assert net.h.shards.get(net.u.key, sid) == data
        # The genuine one works, and makes P a partner at H's admission.
        assert not net.h.service.is_partner(net.p.key)
        await net.p.conns.call(h, "AuditShard", {"id": sid, "leaf": 0, "nonce": os.urandom(32),
                                                 "delegation": good})
        assert net.h.service.is_partner(net.p.key)
        got = await net.p.conns.call(h, "RetrieveShard", {"id": sid, "delegation": good})
        assert got["data"] == data

    await with_net(tmp_path, body)


def test_a_delegation_is_read_only_as_signed():
    owner = nacl.signing.SigningKey.generate()
    delegate = os.urandom(32)
    grant = sign_delegation(owner, delegate, until=time.time() + 60)
    got = read_delegation(grant.raw, delegate)
    assert (got.owner, got.delegate) == (bytes(owner.verify_key), delegate)
    with pytest.raises(DelegationError):
        read_delegation(grant.raw, delegate, now=time.time() + 61)
    with pytest.raises(DelegationError):
        read_delegation(grant.raw + b"\x00", delegate)
    with pytest.raises(ValueError):
        sign_delegation(owner, bytes(owner.verify_key))
