"""The control requests behind `fluidfs invite` and `fluidfs peers add CODE`
(the code's format: peers/invite.py)."""

from __future__ import annotations

import trio

from fluidfs import control
from fluidfs.keys import encode_peer_id
from fluidfs.peers.addrrecord import AddressBook, make_record
from fluidfs.peers.connections import PeerUnavailable
from fluidfs.peers.invite import InviteError, invite_code, read_invite
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.reach import Reachability

NO_ADDRESS = (
    "this node has no address a friend could dial yet: give it --listen HOST:PORT with an "
    "address the friend's machine can reach (or let its router forward a port by UPnP)"
)


def invite_handlers(reach: Reachability, manager: PeerManager,
                    addresses: AddressBook) -> dict[str, control.Handler]:
    """``invite``: this node's code; ``add_invite``: meet the node a code names — at its
    addresses, else through the relays its record names (which *addresses* then keeps,
    so later dials find them too)."""

    async def invite(_request: dict) -> dict:
        record = reach.record
        if record is None:  # the reachability loop has not signed one yet
            addrs = await trio.to_thread.run_sync(reach.addresses)
            via = reach.relays()
            if not addrs and not via:
                raise control.ControlError(NO_ADDRESS)
            record = make_record(reach.identity, addrs, via=via)
        return {
            "code": invite_code(record),
            "id": encode_peer_id(record.key),
            "addrs": [str(a) for a in record.addrs],
            "via": [str(a) for a in record.via],
        }

    async def add_invite(request: dict) -> dict:
        try:
            record = read_invite(str(request.get("code", "")))
        except InviteError as exc:
            raise control.ControlError(str(exc)) from None
        peer_id = encode_peer_id(record.key)
        if record.key == manager.peers.self_key:
            raise control.ControlError("that is this node's own invite code")
        failures = []
        for addr in record.addrs:
            try:
                key, agreed = await manager.add(str(addr), expected=record.key)
            except PeerUnavailable as exc:
                failures.append(str(exc))
                continue
            return {"id": encode_peer_id(key), "addr": str(addr), "agreement": agreed}
        if record.via:
            addresses.offer(record)
        for relay in record.via:
            try:
                key, agreed = await manager.add_via(str(relay), record.key)
            except PeerUnavailable as exc:
                failures.append(str(exc))
                continue
            return {"id": encode_peer_id(key), "addr": f"via relay {relay}",
                    "agreement": agreed}
        raise control.ControlError(
            f"could not meet peer {peer_id} (no node proving that id answered): "
            + "; ".join(failures)
        )

    return {"invite": invite, "add_invite": add_invite}
