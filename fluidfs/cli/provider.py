"""``fluidfs provider add|invite|list|remove``: the operator admits customers to a
provider; ``fluidfs provider join CODE``: a customer redeems an invitation.

The accounts and invitations are written straight into the provider's state directory
(store/accounts.py), whether or not its node is running: only who can write that
directory (the operator) can admit anyone or make a code, and a running node reads them
afresh on every request. ``join`` runs on the customer's machine: it dials the provider
the code names, as the keyfile's identity (peers/providercode.py). See
docs/federation.md.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import TYPE_CHECKING

from fluidfs.cli.common import EXIT_USAGE, fail, state_dir
from fluidfs.keys import KeyfileError, KeyRing, decode_peer_id, encode_peer_id, read_keyfile
from fluidfs.peers.providercode import CodeError, ProviderCode, make_code, read_code
from fluidfs.statedir import StateDir, default_keyfile
from fluidfs.store.accounts import INVITE_SECRET, AccountBook
from fluidfs.store.db import META_TABLES, Database

if TYPE_CHECKING:
    import nacl.signing

JOIN_TIMEOUT = 30.0  # seconds for the dial and handshake, and again for the answer


def cmd_provider(args: argparse.Namespace) -> None:
    """fluidfs provider add CUSTOMER_ID --quota SIZE | invite --quota SIZE | list |
    remove CUSTOMER_ID (the operator) | join CODE (the customer)."""
    if args.action == "join":
        _join(args)
        return
    state = state_dir(args)
    if not state.meta.exists():
        fail(f"{state.path} is not a fluidfs state directory (run `fluidfs serve "
             "--provider` there first)")
    customer = None
    if args.action in ("add", "remove"):
        if not args.customer:
            fail(f"provider {args.action} needs a CUSTOMER_ID", EXIT_USAGE)
        try:
            customer = decode_peer_id(args.customer)
        except ValueError as exc:
            fail(f"not a peer id: {exc}", EXIT_USAGE)
    if args.action in ("add", "invite") and args.quota is None:
        fail(f"provider {args.action} needs --quota SIZE (e.g. 200G)", EXIT_USAGE)
    if args.action == "invite":
        _invite(args, state)
        return
    db = Database(state.meta, META_TABLES)
    try:
        book = AccountBook(db)
        if args.action == "add":
            account = book.add(customer, args.quota)
            print(f"customer {encode_peer_id(customer)} admitted with {account.quota} bytes")
        elif args.action == "remove":
            if not book.remove(customer):
                fail(f"no customer {args.customer} here")
            print(f"customer {args.customer} removed; its reservations end now and their "
                  "shards are kept for the keep period")
        else:
            _list(book, args.json)
    finally:
        db.close()


def _invite(args: argparse.Namespace, state: StateDir) -> None:
    """Make a one-time invitation code and keep its hash at the provider."""
    at = args.at
    if at is None:
        try:
            at = (state.path / "listen").read_text().strip()
        except OSError:
            at = ""
    secret = secrets.token_bytes(INVITE_SECRET)
    provider = _keyring(args).public_key
    try:
        code = make_code(secret, provider, at)
    except CodeError as exc:
        fail(f"give --at HOST:PORT, where customers reach this provider ({exc})", EXIT_USAGE)
    db = Database(state.meta, META_TABLES)
    try:
        invitation = AccountBook(db).invite(secret, args.quota, args.expires)
    finally:
        db.close()
    if args.json:
        print(json.dumps({"code": str(code), "provider": encode_peer_id(provider),
                          "addr": code.addr, "quota": invitation.quota,
                          "expires": invitation.expires}, indent=2))
        return
    print(code, flush=True)
    print(f"(one customer may redeem it before {time.ctime(invitation.expires)}, with "
          f"{invitation.quota} bytes: on its machine run fluidfs provider join CODE)",
          file=sys.stderr)


def _join(args: argparse.Namespace) -> None:
    """Redeem an invitation code at the provider it names, as this keyfile's node."""
    try:
        code = read_code(args.customer or "")
    except CodeError as exc:
        fail(str(exc), EXIT_USAGE)
    # Imported here: the network stack (trio) is for join alone; add and list need none.
    import trio

    from fluidfs.net.errors import ChannelError, RpcError

    ring = _keyring(args)
    provider = f"{encode_peer_id(code.provider)}@{code.addr}"
    try:
        quota = trio.run(_redeem, code, ring.signing_key)
    except RpcError as exc:
        fail(f"provider {provider} refused the code: {exc}")
    except ChannelError as exc:  # no answer, or a node there that is not that provider
        fail(f"could not reach provider {provider}: {exc}")
    if args.json:
        print(json.dumps({"provider": provider, "quota": quota}, indent=2))
        return
    print(f"admitted by provider {provider} with {quota} bytes; mount with "
          f"--provider {provider}")


def _keyring(args: argparse.Namespace) -> KeyRing:
    """This node's keys (the provider's for invite, the customer's for join)."""
    path = (args.keyfile or default_keyfile()).absolute()
    try:
        return KeyRing(read_keyfile(path))
    except KeyfileError as exc:
        fail(str(exc))


async def _redeem(code: ProviderCode, identity: nacl.signing.SigningKey) -> int:
    from fluidfs.net.tcp import open_rpc
    from fluidfs.peers.address import split_host_port

    host, port = split_host_port(code.addr)
    async with open_rpc(host, port, identity, code.provider, timeout=JOIN_TIMEOUT) as conn:
        reply = await conn.call("RedeemInvite", {"secret": code.secret}, timeout=JOIN_TIMEOUT)
    return reply["quota"]


def _list(book: AccountBook, as_json: bool) -> None:
    rows = []
    for account in book.accounts():
        live = [r for r in book.reservations(account.customer) if r.live]
        rows.append({
            "id": encode_peer_id(account.customer),
            "quota": account.quota,
            "reserved": sum(r.size for r in live),
            "reservations": len(live),
        })
    invitations = [{"quota": i.quota, "expires": i.expires} for i in book.invitations()]
    if as_json:
        print(json.dumps({"customers": rows, "invitations": invitations}, indent=2))
        return
    if not rows:
        print("no customers (admit one with: fluidfs provider add CUSTOMER_ID --quota 200G, "
              "or invite one with: fluidfs provider invite --quota 200G)")
    for row in rows:
        print(f"{row['id']}  quota {row['quota']}  reserved {row['reserved']} "
              f"in {row['reservations']} reservations")
    for invitation in invitations:
        print(f"invitation not yet redeemed: quota {invitation['quota']}, valid until "
              f"{time.ctime(invitation['expires'])}")
