"""The in-process provider network the provider tests share (docs/federation.md).

Storage providers, partners and U, the customer, each a ``PeerNode`` (real services, real
LMDB, real loopback sockets). U never listens: whatever a partner gets for U comes from
a provider. U's side is the real ``PeerManager`` with a ``ProviderClient``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from inproc import PeerNode

from fluidfs.blocks import merkle
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import MIB
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.provider import ProviderClient

SIZE = 4 * MIB  # what U offers each partner, reserved at its provider


def shard(size: int = 100_000) -> tuple[bytes, bytes]:
    """(shard id, *size* random bytes)."""
    data = os.urandom(size)
    return merkle.shard_id(data), data


async def run_net(net: Any, body: Callable[[Any], Awaitable[None]]) -> None:
    """Start *net* (anything with ``start(nursery)`` and ``close()``), run *body* with
    it, then stop and close everything."""
    try:
        async with trio.open_nursery() as nursery:
            await net.start(nursery)
            await body(net)
            nursery.cancel_scope.cancel()
    finally:
        net.close()


class Reader:
    """X reading every shard it stored with U, round after round, while U's side moves:
    what it failed to read (or read wrong) and how many reads it made."""

    def __init__(self, x: PeerNode, u: PeerNode, stored: dict[bytes, bytes]) -> None:
        self.x, self.u, self.stored = x, u, stored  # *stored* may grow meanwhile
        self.failures: list[str] = []
        self.reads = 0
        self._done = False

    async def run(self) -> None:
        """Read until ``stop``, which ends it between calls."""
        while not self._done:
            for sid, data in list(self.stored.items()):
                try:
                    got = await self.x.conns.call(self.u.key, "RetrieveShard", {"id": sid})
                except RpcError as exc:
                    self.failures.append(f"{sid.hex()[:8]}: {exc.code}")
                    continue
                if got["data"] != data:
                    self.failures.append(f"{sid.hex()[:8]}: wrong bytes")
                self.reads += 1
            await trio.sleep(0)

    async def stop_after_a_full_round(self) -> None:
        """Let it read every shard once more (and some), then stop it."""
        before = self.reads
        while self.reads < before + 2 * len(self.stored):
            await trio.sleep(0.01)
        self._done = True


class ProviderNet:
    """Providers and partners named by their directory in *root*, and U (listening if
    ``u_listens``: a node holding its side itself must be reachable)."""

    u_listens = False

    def __init__(self, root, providers: Iterable[str], partners: Iterable[str],
                 **provider_kw) -> None:
        self.providers = [PeerNode(root / name, provider=True, **provider_kw)
                          for name in providers]
        self.u = PeerNode(root / "u", proposes_only=True)
        self.partners = [PeerNode(root / name) for name in partners]

    async def start(self, nursery: trio.Nursery) -> None:
        """Start every node; all but U (unless ``u_listens``) listen on 127.0.0.1."""
        for node in (*self.providers, *self.partners):
            await node.start(nursery)
        await self.u.start(nursery, listen=self.u_listens)

    def client_at(self, provider: PeerNode) -> ProviderClient:
        """U's client of *provider*."""
        return ProviderClient(self.u.conns, self.u.ledger, provider.key, provider.addr)

    def manager_for(self, client: ProviderClient) -> PeerManager:
        """U's peer manager with its side held through *client*."""
        return PeerManager(self.u.conns, self.u.peers, self.u.ledger, donate=1 << 30,
                           agreement_size=SIZE, provider=client)

    async def store(self, count: int) -> dict[bytes, bytes]:
        """The first partner stores *count* shards with U (wherever U's side is held)."""
        stored = dict(shard() for _ in range(count))
        reply = await self.partners[0].conns.call(self.u.key, "StoreShard", {
            "shards": [{"id": sid, "data": data} for sid, data in stored.items()]})
        assert sorted(reply["stored"]) == sorted(stored)
        return stored

    def close(self) -> None:
        for node in (*self.providers, self.u, *self.partners):
            node.close()

    async def run(self, body: Callable[[Any], Awaitable[None]]) -> None:
        """Start the network, run *body* with it, then stop and close everything."""
        await run_net(self, body)
