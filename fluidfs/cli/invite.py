"""Meeting a friend: ``fluidfs invite`` and ``fluidfs peers add CODE`` (peers/invite.py)."""

from __future__ import annotations

import argparse
import json
import sys

from fluidfs.cli.nodecall import call_node
from fluidfs.peers.invite import is_invite

__all__ = ["add_invited", "cmd_invite", "is_invite"]


def cmd_invite(args: argparse.Namespace) -> None:
    """fluidfs invite: print this node's invite code (it names the peer id and addresses)."""
    reply = call_node(args, "invite")
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return
    print(reply["code"], flush=True)
    where = [*reply["addrs"], *(f"via relay {a}" for a in reply.get("via", []))]
    print(f"(peer {reply['id']} at {', '.join(where)}; on your friend's machine "
          "run: fluidfs peers add CODE)", file=sys.stderr)


def add_invited(args: argparse.Namespace) -> None:
    """fluidfs peers add CODE: meet the node the code names, only if it proves its id."""
    # The dial may try up to three addresses, each with its handshake timeout.
    reply = call_node(args, "add_invite", timeout=120.0, code=args.addr)
    note = "agreement made" if reply["agreement"] else "no agreement (yet)"
    print(f"added peer {reply['id']} at {reply['addr']}: {note}")
