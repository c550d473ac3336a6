"""A storage provider's one-time invitation codes (issue 13 item 1, docs/federation.md):
the operator makes a code (`fluidfs provider invite`), one node redeems it
(``RedeemInvite``) and becomes a customer; forged, used, expired and mistyped codes admit
nobody.

Real parts in-process (tests/fast/providernet.py): P is a provider ``PeerNode``, Y and U
strangers to it, X a node that is no provider.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import trio
from providernet import ProviderNet

from fluidfs import keys
from fluidfs.cli.main import main as fluidfs_main
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import MIB
from fluidfs.peers.providercode import CodeError, make_code, read_code
from fluidfs.store.accounts import AccountBook, invite_key
from fluidfs.store.db import META_TABLES, Database

SECRET = 16


class Net(ProviderNet):
    """P (provider), U (never listens) and the partners X and Y."""

    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path, providers=["p"], partners=["x", "y"])
        (self.p,), (self.x, self.y) = self.providers, self.partners
        self.book: AccountBook = self.p.service.provider.book

    async def redeem(self, node, secret: bytes, to=None) -> dict:
        """*node* presents *secret* to P (or to *to*)."""
        to = to or self.p
        return await node.conns.call(to.key, "RedeemInvite", {"secret": secret}, addr=to.addr)

    async def refused(self, node, secret: bytes, to=None) -> str:
        with pytest.raises(RpcError) as err:
            await self.redeem(node, secret, to)
        return err.value.code


async def test_an_invitation_admits_one_node_once(tmp_path):
    """Two strangers present the same code at once: exactly one becomes a customer with
    the code's quota and can reserve; the other, and the winner again, are refused."""

    async def body(net: Net) -> None:
        secret = os.urandom(SECRET)
        net.book.invite(secret, 10 * MIB, 3600)
        outcomes: dict[bytes, object] = {}

        async def present(node) -> None:
            try:
                outcomes[node.key] = await net.redeem(node, secret)
            except RpcError as exc:
                outcomes[node.key] = exc.code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(present, net.y)
            nursery.start_soon(present, net.u)
        assert sorted(outcomes.values(), key=str) == ["refused", {"quota": 10 * MIB}]
        [winner] = [k for k, v in outcomes.items() if v != "refused"]
        loser = net.u.key if winner == net.y.key else net.y.key
        assert net.book.account(winner).quota == 10 * MIB
        assert net.book.account(loser) is None
        assert net.book.invitations() == []
        node = net.y if winner == net.y.key else net.u
        assert await net.refused(node, secret) == "refused"  # used up
        reserved = await node.conns.call(net.p.key, "Reserve",
                                         {"peer": net.x.key, "size": 4 * MIB}, addr=net.p.addr)
        assert reserved == {"size": 4 * MIB}

    await Net(tmp_path).run(body)


async def test_forged_expired_and_misdirected_codes_admit_nobody(tmp_path):
    """A secret never made, an expired invitation (deleted when presented), a secret of
    the wrong length and a code sent to a node that is no provider: refused, and nobody
    is admitted. A customer redeeming a smaller invitation keeps its larger quota."""

    async def body(net: Net) -> None:
        assert await net.refused(net.y, os.urandom(SECRET)) == "refused"
        expired = os.urandom(SECRET)
        net.book.invite(expired, 10 * MIB, 60)
        clock = net.book.clock
        net.book.clock = lambda: clock() + 61
        try:
            assert await net.refused(net.y, expired) == "refused"
        finally:
            net.book.clock = clock
        assert net.book.invitations() == []  # the expired one went when presented
        assert await net.refused(net.y, expired) == "refused"
        for bad in (b"\x01" * (SECRET - 1), b"\x01" * (SECRET + 1)):
            conn = await net.y.conns.get(net.p.key, net.p.addr)
            conn.ops = {}  # no client-side checks: the provider must refuse
            with pytest.raises(RpcError) as err:
                await conn.call("RedeemInvite", {"secret": bad})
            assert err.value.code == "bad_request"
        made = os.urandom(SECRET)
        net.book.invite(made, 10 * MIB, 3600)
        with pytest.raises(RpcError) as err:
            await net.redeem(net.y, made, to=net.x)  # X keeps no accounts
        assert err.value.code in ("unknown_op", "refused")
        assert net.book.accounts() == []

        net.book.add(net.u.key, 20 * MIB)
        assert await net.redeem(net.u, made) == {"quota": 20 * MIB}
        assert net.book.account(net.u.key).quota == 20 * MIB

    await Net(tmp_path).run(body)


def test_codes_read_back_and_mistyped_ones_are_refused() -> None:
    """A code carries the secret, the provider's id and its address; pasted with spaces
    or in capitals it reads the same; anything else is a CodeError, never a crash."""
    secret, provider = os.urandom(SECRET), os.urandom(32)
    code = make_code(secret, provider, "backup.example.org:7470")
    text = str(code)
    assert text.startswith("ffp1-")
    spaced = " ".join(text[i:i + 8] for i in range(0, len(text), 8)).upper()
    for pasted in (text, spaced, f"\n{text}\n"):
        back = read_code(pasted)
        assert (back.secret, back.provider, back.addr) == (secret, provider,
                                                           "backup.example.org:7470")
    for bad in ("", "ffi1-" + text[5:], text[:20], text + "1", "ffp1-" + "a" * 2000,
                str(make_code(secret, provider, "example.org:1"))[:-3] + "!!!"):
        with pytest.raises(CodeError):
            read_code(bad)
    for addr in ("0.0.0.0:7470", "host", "host:0", "h" * 300 + ":1", ""):
        with pytest.raises(CodeError):
            make_code(secret, provider, addr)


def test_the_operator_makes_codes_the_provider_keeps_only_hashed(tmp_path, capsys):
    """`fluidfs provider invite` prints a code naming the provider's id and address and
    keeps its invitation (quota, expiry) under a hash of the secret; without an address
    it can give, it says to pass --at."""
    state = tmp_path / "state"
    Database(state / "meta.lmdb", META_TABLES).close()  # a provider's state directory
    keyfile = tmp_path / "p.key"
    keys.write_keyfile(keyfile, keys.generate())
    provider = keys.KeyRing(keys.read_keyfile(keyfile)).public_key
    base = ["provider", "invite", "--quota", "200G", "--keyfile", str(keyfile),
            "--state-dir", str(state)]
    with pytest.raises(SystemExit) as exit_:  # no --at, and the node never listened
        fluidfs_main(base)
    assert exit_.value.code == 2 and "--at" in capsys.readouterr().err
    (state / "listen").write_text("0.0.0.0:7470\n")  # not an address a customer can dial
    with pytest.raises(SystemExit):
        fluidfs_main(base)
    for never in ("0", "400d", "soon"):
        with pytest.raises(SystemExit) as exit_:
            fluidfs_main([*base, "--at", "backup.example.org:7470", "--expires", never])
        assert exit_.value.code == 2
    capsys.readouterr()

    before = time.time()
    fluidfs_main([*base, "--at", "backup.example.org:7470", "--expires", "2d", "--json"])
    made = json.loads(capsys.readouterr().out)
    code = read_code(made["code"])
    assert (code.provider, code.addr) == (provider, "backup.example.org:7470")
    assert made["provider"] == keys.encode_peer_id(provider)
    (state / "listen").write_text("127.0.0.1:7470\n")
    fluidfs_main(base)  # where the running node listens
    second = read_code(capsys.readouterr().out.strip())
    assert second.addr == "127.0.0.1:7470" and second.secret != code.secret

    fluidfs_main(["provider", "list", "--json", "--state-dir", str(state)])
    listed = json.loads(capsys.readouterr().out)
    assert [i["quota"] for i in listed["invitations"]] == [200 << 30] * 2
    db = Database(state / "meta.lmdb", META_TABLES)
    try:
        [first] = [i for i in AccountBook(db).invitations() if i.expires < before + 3 * 86400]
        assert before + 2 * 86400 - 5 <= first.expires <= time.time() + 2 * 86400
        with db.read() as txn:
            assert txn.get(invite_key(code.secret), db=db["invites"]) is not None
    finally:
        db.close()
    raw = (state / "meta.lmdb" / "data.mdb").read_bytes()
    assert code.secret not in raw and second.secret not in raw
