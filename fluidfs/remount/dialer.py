"""Reaching the keyfile's peers before the mount: the bootstrap and pinned addresses.

Bootstrap addresses without a peer id are dialled as whoever answers there; entries
naming a peer id (``PEERID@HOST:PORT``) are dialled as that peer only, so anyone else
at that address is refused. Why each failed is kept for the refusal message of a
fresh state directory that cannot tell whether a backup exists (remount/gate.py).
"""

from __future__ import annotations

import trio

from fluidfs.keys import BootstrapPeer
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.peerlist import PeerList

DIAL_WAIT = 6.0


class PeerDialer:
    """Dials the bootstrap and pinned peers this node is not connected to yet."""

    def __init__(
        self,
        conns: Connections,
        peers: PeerList,
        self_key: bytes,
        bootstrap: list[str],
        pinned: list[BootstrapPeer],
    ) -> None:
        self.conns = conns
        self.peers = peers
        self.self_key = self_key
        self.bootstrap = bootstrap
        self.pinned = pinned
        self.errors: dict[str, str] = {}  # address -> why the last dial failed

    def tried(self) -> list[str]:
        """Every address dialled, for messages."""
        return [str(e) for e in self.pinned] + list(self.bootstrap)

    def know_pinned(self) -> None:
        """List the pinned peers among the known ones, as a dial that reached them does:
        requests made to the known peers dial them as they go (``Connections.get``)."""
        for entry in self.pinned:
            if entry.key == self.self_key:
                continue
            known = self.peers.get(entry.key)
            if known is None or not known.addr:
                self.peers.add(entry.key, entry.addr)

    async def reach(self, *, pinned: bool = True) -> None:
        """Dial every address not connected yet, in parallel, for at most DIAL_WAIT s;
        the bare bootstrap addresses only, without *pinned*.

        A pinned peer is dialled as ``Connections.get`` dials it, under the same lock:
        a request made meanwhile (the gate reads the root while this runs) waits for
        this dial, or this for its, rather than open a second connection."""
        live = {key for key, conn in self.conns.conns.items() if not conn.closed}
        connected = {p.addr for p in self.peers if p.key in live}
        targets: list[tuple[str, bytes | None]] = [
            (a, None)
            for a in self.bootstrap
            if a != self.conns.listen_addr and a not in connected
        ]
        if pinned:
            targets += [(e.addr, e.key) for e in self.pinned if e.key not in live]

        async def one(addr: str, expected: bytes | None) -> None:
            try:
                if expected is None:
                    conn = await self.conns.connect(addr)
                else:
                    conn = await self.conns.get(expected, addr, backoff=False)
            except (PeerUnavailable, ValueError) as exc:
                self.errors[addr] = str(exc).removeprefix(f"{addr}: ")
                return
            self.errors.pop(addr, None)
            if conn.peer_key != self.self_key:
                self.peers.add(conn.peer_key, addr)

        with trio.move_on_after(DIAL_WAIT):
            async with trio.open_nursery() as nursery:
                for addr, expected in targets:
                    nursery.start_soon(one, addr, expected)
