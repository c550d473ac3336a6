"""A real `fluidfs serve` peer facing misbehaving clients: clear errors, nothing lost."""

from __future__ import annotations

import contextlib
import os
import struct

import nacl.signing
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peerhelpers import Peer, endpoint, random_shard

from fluidfs.blocks import merkle
from fluidfs.net.errors import HandshakeError, NetError, RpcError
from fluidfs.net.tcp import open_rpc

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    p = Peer(tmp_path_factory.mktemp("bad"), "server", donate="64M").start()
    yield p
    p.kill()


shard = random_shard


async def expect_code(code: str, coro) -> None:
    with pytest.raises(RpcError) as info:
        await coro
    assert info.value.code == code, info.value


async def ping_works(peer: Peer) -> None:
    async with open_rpc(*endpoint(peer), nacl.signing.SigningKey.generate()) as conn:
        assert (await conn.call("Ping", {}))["time"] > 0


async def test_store_needs_an_agreement_and_stays_within_it(peer):
    me = nacl.signing.SigningKey.generate()
    async with open_rpc(*endpoint(peer), me) as conn:
        await expect_code("no_agreement", conn.call("StoreShard", {"shards": [shard(100)]}))
        greedy = await conn.call("ProposeAgreement", {"offer": MIB, "ask": 100 * MIB,
                                                      "term": 3600})
        assert not greedy["accepted"] and "ratio" in greedy["reason"]
        huge = await conn.call("ProposeAgreement", {"offer": 10**12, "ask": 10**12,
                                                    "term": 3600})
        assert not huge["accepted"] and "space" in huge["reason"]
        ok = await conn.call("ProposeAgreement", {"offer": MIB, "ask": MIB, "term": 3600})
        assert ok["accepted"]
        batch = [shard(400 * 1024) for _ in range(3)]
        reply = await conn.call("StoreShard", {"shards": batch})
        assert reply["stored"] == [batch[0]["id"], batch[1]["id"]]
        assert reply["refused"] == [{"id": batch[2]["id"], "code": "over_quota"}]
        back = await conn.call("RetrieveShard", {"id": batch[0]["id"]})
        assert back["data"] == batch[0]["data"]


async def test_lying_store_and_foreign_retrieve_are_refused(peer):
    owner, other = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    mine = shard(1000)
    async with open_rpc(*endpoint(peer), owner) as conn:
        await conn.call("ProposeAgreement", {"offer": MIB, "ask": MIB, "term": 3600})
        forged = {"id": mine["id"], "data": b"not what the id says"}
        reply = await conn.call("StoreShard", {"shards": [forged]})
        assert reply["refused"] == [{"id": mine["id"], "code": "bad_shard"}]
        assert (await conn.call("StoreShard", {"shards": [mine]}))["stored"] == [mine["id"]]
    async with open_rpc(*endpoint(peer), other) as conn:
        await expect_code("not_found", conn.call("RetrieveShard", {"id": mine["id"]}))
        await expect_code("not_found", conn.call("AuditShard",
                                                 {"id": mine["id"], "leaf": 0,
                                                  "nonce": bytes(32)}))
        assert (await conn.call("DeleteShard", {"ids": [mine["id"]]}))["deleted"] == 0
    async with open_rpc(*endpoint(peer), owner) as conn:
        assert (await conn.call("RetrieveShard", {"id": mine["id"]}))["data"] == mine["data"]
        proof = await conn.call("AuditShard", {"id": mine["id"], "leaf": 0, "nonce": bytes(32)})
        assert merkle.verify(mine["id"], 1000, 0, proof["leaf_data"], proof["path"])


async def test_wrong_identity_is_refused(peer):
    impostor = nacl.signing.SigningKey.generate().verify_key.encode()
    with pytest.raises(HandshakeError):
        async with open_rpc(*endpoint(peer), nacl.signing.SigningKey.generate(),
                            expected_peer=impostor):
            pass
    async with open_rpc(*endpoint(peer), nacl.signing.SigningKey.generate(),
                        expected_peer=peer.public_key) as conn:
        await conn.call("Ping", {})


async def test_garbage_and_oversized_frames_do_not_hurt_the_server(peer):
    for junk in (os.urandom(200), struct.pack(">I", 0xFFFFFFFF) + b"x" * 10, b"\x00" * 3):
        stream = await trio.open_tcp_stream(*endpoint(peer))
        with trio.move_on_after(2), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(junk)
            while await stream.receive_some(4096):
                pass  # the server answers junk by hanging up
        await stream.aclose()
    await ping_works(peer)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(args=st.dictionaries(st.sampled_from(["id", "ids", "shards", "offer", "leaf", "x"]),
                            st.one_of(st.integers(), st.binary(max_size=40), st.text(max_size=5),
                                      st.lists(st.integers(), max_size=3), st.none()),
                            max_size=3),
       op=st.sampled_from(["StoreShard", "RetrieveShard", "RetrieveShards", "DeleteShard",
                           "AuditShard", "ProposeAgreement", "Nope"]))
def test_wrongly_typed_requests_get_error_replies(peer, args, op):
    async def main():
        async with open_rpc(*endpoint(peer), nacl.signing.SigningKey.generate(),
                            ops={}) as conn:
            with pytest.raises(NetError) as info:
                await conn.call(op, args, timeout=10)
            # An error reply, or (for bytes the envelope decoder refuses outright, such
            # as a CBOR bignum) a dropped connection; never a crash of the server.
            assert info.value.code in {"bad_request", "unknown_op", "not_found",
                                       "no_agreement", "connection_lost"}
        await ping_works(peer)

    trio.run(main)
