"""Meeting a friend by invite code (peers/invite.py, node/invite.py): `fluidfs invite`
prints a code carrying the node's id and signed addresses; `fluidfs peers add CODE` meets
that node only if the one answering at the address proves the id.

Two real ``Node``s run their services in this trio run on 127.0.0.1 (real LMDB, real
handshakes); the requests are the ones the control socket answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fluidfs import control, keys
from fluidfs.cli.main import build_parser
from fluidfs.node.node import Node, NodeConfig
from fluidfs.peers.address import PeerAddr
from fluidfs.peers.addrrecord import make_record
from fluidfs.peers.invite import MAX_CODE, PREFIX, InviteError, invite_code, read_invite
from fluidfs.statedir import StateDir


@contextlib.asynccontextmanager
async def nodes(tmp_path: Path, count: int) -> AsyncIterator[list[Node]]:
    made = [
        Node(NodeConfig(keys.KeyRing(keys.generate()), StateDir(tmp_path / f"n{i}"),
                        listen="127.0.0.1:0", donate=1 << 30))
        for i in range(count)
    ]
    try:
        async with trio.open_nursery() as nursery:
            for node in made:
                await node.start()
                await nursery.start(node.run_services)
            yield made
            nursery.cancel_scope.cancel()
    finally:
        for node in made:
            node.close()


async def ask(node: Node, request: str, **args) -> dict:
    return await node.control_handlers()[request](args)


async def test_a_friend_meets_this_node_by_its_invite_code(tmp_path: Path) -> None:
    async with nodes(tmp_path, 2) as (me, friend):
        invite = await ask(me, "invite")
        code = invite["code"]
        assert code.startswith(PREFIX) and len(code) < 300, code
        assert invite["id"] == me.config.keyring.peer_id
        assert invite["addrs"] == [me.conns.listen_addr]

        # pasted with a line break and in capitals, as a chat program may pass it on
        pasted = code[:40] + "\n" + code[40:].upper()
        met = await ask(friend, "add_invite", code=pasted)
        assert met["id"] == me.config.keyring.peer_id
        assert met["addr"] == me.conns.listen_addr
        assert met["agreement"], "the friend proposed and this node accepted"
        row = friend.peers.get(me.config.keyring.public_key)
        assert row is not None and row.addr == me.conns.listen_addr
        assert friend.ledger.live(me.config.keyring.public_key) is not None


async def test_a_code_whose_id_does_not_answer_at_its_address_is_refused(
    tmp_path: Path,
) -> None:
    """Someone else holds the address now (or intercepts it): the node answering there
    cannot prove the code's id, so the friend meets nobody and learns nobody."""
    async with nodes(tmp_path, 2) as (squatter, friend):
        expected = keys.KeyRing(keys.generate())  # the friend we meant, not at that address
        record = make_record(expected.signing_key, [PeerAddr.parse(squatter.conns.listen_addr)])
        with pytest.raises(control.ControlError) as refused:
            await ask(friend, "add_invite", code=invite_code(record))
        assert f"could not meet peer {expected.peer_id}" in str(refused.value)
        assert "identity is not the expected one" in str(refused.value)
        assert friend.peers.get(squatter.config.keyring.public_key) is None
        assert friend.peers.get(expected.public_key) is None
        assert not list(friend.ledger)


async def test_peers_add_with_a_peer_id_meets_only_that_peer(tmp_path: Path) -> None:
    """`peers add PEERID@HOST:PORT` pins the id as a code does; plain HOST:PORT meets
    whoever answers."""
    async with nodes(tmp_path, 2) as (me, friend):
        addr = me.conns.listen_addr
        stranger = keys.KeyRing(keys.generate())
        with pytest.raises(control.ControlError, match="identity is not the expected one"):
            await ask(friend, "add_peer", addr=f"{stranger.peer_id}@{addr}")
        assert friend.peers.get(me.config.keyring.public_key) is None
        met = await ask(friend, "add_peer", addr=f"{me.config.keyring.peer_id}@{addr}")
        assert met["id"] == me.config.keyring.peer_id and met["agreement"]
        assert (await ask(friend, "add_peer", addr=addr))["id"] == me.config.keyring.peer_id


async def test_a_node_without_a_dialable_address_says_so(tmp_path: Path) -> None:
    node = Node(NodeConfig(keys.KeyRing(keys.generate()), StateDir(tmp_path / "n")))
    try:
        await node.start()
        with pytest.raises(control.ControlError, match="no address a friend could dial"):
            await ask(node, "invite")
    finally:
        node.close()


def test_altered_or_mistyped_codes_are_refused() -> None:
    ring = keys.KeyRing(keys.generate())
    code = invite_code(make_record(ring.signing_key, [PeerAddr.parse("198.51.100.7:7470")]))
    assert read_invite(code).key == ring.public_key
    body = code[len(PREFIX):]
    flipped = PREFIX + body[:30] + ("a" if body[30] != "a" else "b") + body[31:]
    for bad, says in [
        (flipped, "not a valid invite code"),  # one letter changed: the signature fails
        (code[:-8], "not a valid invite code"),  # cut short
        (PREFIX + "0189", "not base32"),
        ("ffi2-" + body, "should start with ffi1-"),
        (PREFIX + "a" * MAX_CODE, "longer than"),
        (PREFIX, "not a valid invite code"),
    ]:
        with pytest.raises(InviteError, match=says):
            read_invite(bad)


def test_peers_add_takes_a_code_or_an_address_and_refuses_a_bad_code(capsys) -> None:
    ring = keys.KeyRing(keys.generate())
    code = invite_code(make_record(ring.signing_key, [PeerAddr.parse("198.51.100.7:7470")]))
    parser = build_parser()
    assert parser.parse_args(["peers", "add", code]).addr == code
    assert parser.parse_args(["peers", "add", "198.51.100.7:7470"]).addr == "198.51.100.7:7470"
    pinned = f"{ring.peer_id}@198.51.100.7:7470"
    assert parser.parse_args(["peers", "add", pinned]).addr == pinned
    with pytest.raises(SystemExit):
        parser.parse_args(["peers", "add", code[:-8]])
    assert "not a valid invite code" in capsys.readouterr().err
