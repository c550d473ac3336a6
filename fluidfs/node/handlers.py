"""The node's own control requests: `fluidfs peers`, `peers add`, `status` and `check`.

Each answer is a JSON-able dict (control.py, protocol version 1); errors the user
can act on become ``ControlError`` here, at the edge. The remount part's requests
(sync, snapshots, forget) are remount/control.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fluidfs import control
from fluidfs.blocks.blockstore import BlockStore
from fluidfs.blocks.record import LOCAL_HOLDER
from fluidfs.fs import health
from fluidfs.fs.tree import Tree
from fluidfs.keys import encode_peer_id, parse_peer
from fluidfs.net.errors import RpcError
from fluidfs.node.status import NodeStatus
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable, split_addr
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.peerlist import PeerList
from fluidfs.store.shards import ShardStore

PING_TIMEOUT = 5.0


def node_handlers(
    peer_list: PeerList,
    ledger: Ledger,
    shards: ShardStore,
    manager: PeerManager,
    conns: Connections,
    tree: Tree,
    blocks: BlockStore,
    node_status: NodeStatus,
) -> dict[str, control.Handler]:
    """What `fluidfs peers`, `fluidfs status` and `fluidfs check` can ask."""

    async def peers(_request: dict) -> dict:
        rows = []
        for peer in peer_list:
            agreement = ledger.get(peer.key)
            rows.append(
                {
                    "active": bool(agreement and agreement.active),
                    "id": encode_peer_id(peer.key),
                    "addr": peer.addr,
                    "last_seen": peer.last_seen,
                    "trust": peer.trust,
                    "we_host": agreement.we_host if agreement else 0,
                    "we_use": shards.used(peer.key),
                    "they_host": agreement.they_host if agreement else 0,
                    "they_use": agreement.they_use if agreement else 0,
                    "audits_passed": peer.ok,
                    "audits_failed": peer.fail,
                    "failing_since": agreement.failing_since if agreement else None,
                    "caught": peer.caught or None,  # when it last served a corrupt shard
                    # storage providers: the one holding our side, and the one holding its
                    "held_at": _provider_id(agreement.reserved_at if agreement else None),
                    "their_side_at": _provider_id(agreement.store_at_id if agreement
                                                  else None),
                }
            )
        return {"peers": rows}

    async def add_peer(request: dict) -> dict:
        # HOST:PORT, or PEERID@HOST:PORT: then only that peer is met there
        try:
            entry = parse_peer(str(request.get("addr", "")))
            split_addr(entry.addr)
            key, agreed = await manager.add(entry.addr, expected=entry.key)
        except (ValueError, PeerUnavailable) as exc:
            raise control.ControlError(str(exc)) from None
        return {"id": encode_peer_id(key), "agreement": agreed}

    async def status(_request: dict) -> dict:
        return await node_status.report()

    async def check_files(request: dict) -> dict:
        copies = health.CopyReport()
        results = await health.check(
            tree,
            blocks,
            reachable=reachable_probe(peer_list, conns),
            read_data=bool(request.get("read_data")),
            copies=copies,
        )
        return {
            "files": [vars(r) for r in results],
            "shards_needed": blocks.codec.needed,
            "bad_blocks": copies.blocks,
            "copies_by_peer": {peer: dict(counts) for peer, counts in copies.peers.items()},
        }

    return {"peers": peers, "add_peer": add_peer, "status": status, "check": check_files}


def reachable_probe(peer_list: PeerList, conns: Connections) -> Callable[[int], Awaitable[bool]]:
    """A holder-index → answers-now probe that pings each peer once."""
    answers: dict[int, bool] = {}

    async def reachable(holder: int) -> bool:
        if holder == LOCAL_HOLDER:
            return True
        if holder not in answers:
            key = peer_list.key_of(holder)
            try:
                if key is None:
                    raise PeerUnavailable("unknown holder")
                await conns.call(key, "Ping", {}, timeout=PING_TIMEOUT)
                answers[holder] = True
            except (PeerUnavailable, RpcError):
                answers[holder] = False
        return answers[holder]

    return reachable


def _provider_id(key: bytes | None) -> str | None:
    return None if key is None else encode_peer_id(key)
