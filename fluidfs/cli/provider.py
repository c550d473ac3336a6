"""``fluidfs provider add|list|remove``: the operator admits customers to a provider.

The accounts are written straight into the provider's state directory
(store/accounts.py), whether or not its node is running: only who can write that
directory (the operator) can admit anyone, and a running node reads them afresh on
every request. See docs/federation.md.
"""

from __future__ import annotations

import argparse
import json

from fluidfs.cli.common import EXIT_USAGE, fail, state_dir
from fluidfs.keys import decode_peer_id, encode_peer_id
from fluidfs.store.accounts import AccountBook
from fluidfs.store.db import META_TABLES, Database


def cmd_provider(args: argparse.Namespace) -> None:
    """fluidfs provider add CUSTOMER_ID --quota SIZE | list | remove CUSTOMER_ID."""
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
    if args.action == "add" and args.quota is None:
        fail("provider add needs --quota SIZE (e.g. 200G)", EXIT_USAGE)
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
    if as_json:
        print(json.dumps({"customers": rows}, indent=2))
        return
    if not rows:
        print("no customers (admit one with: fluidfs provider add CUSTOMER_ID --quota 200G)")
    for row in rows:
        print(f"{row['id']}  quota {row['quota']}  reserved {row['reserved']} "
              f"in {row['reservations']} reservations")
