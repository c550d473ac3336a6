"""The in-process provider network the provider tests share (docs/federation.md).

Storage providers, partners and U, the customer, each a ``PeerNode`` (real services, real
LMDB, real loopback sockets). U never listens: whatever a partner gets for U comes from
a provider. U's side is the real ``PeerManager`` with a ``ProviderClient``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable

import trio
from inproc import PeerNode

from fluidfs.blocks import merkle
from fluidfs.peers.agreements import MIB
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.provider import ProviderClient

SIZE = 4 * MIB  # what U offers each partner, reserved at its provider


def shard(size: int = 100_000) -> tuple[bytes, bytes]:
    """(shard id, *size* random bytes)."""
    data = os.urandom(size)
    return merkle.shard_id(data), data


class ProviderNet:
    """Providers and partners named by their directory in *root*, and U."""

    def __init__(self, root, providers: Iterable[str], partners: Iterable[str]) -> None:
        self.providers = [PeerNode(root / name, provider=True) for name in providers]
        self.u = PeerNode(root / "u", proposes_only=True)
        self.partners = [PeerNode(root / name) for name in partners]

    async def start(self, nursery: trio.Nursery) -> None:
        """Start every node; all but U listen on 127.0.0.1."""
        for node in (*self.providers, *self.partners):
            await node.start(nursery)
        await self.u.start(nursery, listen=False)

    def client_at(self, provider: PeerNode) -> ProviderClient:
        """U's client of *provider*."""
        return ProviderClient(self.u.conns, self.u.ledger, provider.key, provider.addr)

    def manager_for(self, client: ProviderClient) -> PeerManager:
        """U's peer manager with its side held through *client*."""
        return PeerManager(self.u.conns, self.u.peers, self.u.ledger, donate=1 << 30,
                           agreement_size=SIZE, provider=client)

    def close(self) -> None:
        for node in (*self.providers, self.u, *self.partners):
            node.close()

    async def run(self, body: Callable[[ProviderNet], Awaitable[None]]) -> None:
        """Start the network, run *body* with it, then stop and close everything."""
        try:
            async with trio.open_nursery() as nursery:
                await self.start(nursery)
                await body(self)
                nursery.cancel_scope.cancel()
        finally:
            self.close()
