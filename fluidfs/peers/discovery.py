"""Discovery: from a few known peers, find enough of the network (the seed's ShareNewPeers).

While fewer than ``target`` peers are known, ask a few of the known ones for
theirs every ``fast`` seconds; once there are enough, keep asking every
``slow`` seconds so the list stays fresh. A peer learned this way remembers who
referred it (for referral trust). Peers without an agreement are offered one;
peers unseen for ``forget_after`` seconds that hold nothing of ours and host
nothing for us are forgotten.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.pool import Connections, PeerUnavailable

log = logging.getLogger(__name__)


@dataclass
class DiscoveryPolicy:
    """How eagerly to look for peers."""

    target: int = 24  # default 2N
    fast: float = 1.0
    slow: float = 30.0
    fanout: int = 3  # peers asked per round
    forget_after: float = 7 * 24 * 3600


class Discovery:
    """Keeps the peer list filled."""

    def __init__(
        self,
        conns: Connections,
        peers: PeerList,
        ledger: Ledger,
        manager: PeerManager,
        policy: DiscoveryPolicy,
    ) -> None:
        self.conns = conns
        self.peers = peers
        self.ledger = ledger
        self.manager = manager
        self.policy = policy

    async def run(self) -> None:
        """Discover until cancelled."""
        while True:
            wanting = len(self.peers) < self.policy.target
            await self.round()
            self.forget_stale()
            await trio.sleep(self.policy.fast if wanting else self.policy.slow)

    async def round(self) -> None:
        """Ask a few known peers for theirs, and offer agreements where there are none."""
        reachable = [p.key for p in self.peers if p.addr and not self.conns.backing_off(p.key)]
        random.shuffle(reachable)
        async with trio.open_nursery() as nursery:
            for key in reachable[: self.policy.fanout]:
                nursery.start_soon(self._ask, key)
        if self.manager.propose:
            async with trio.open_nursery() as nursery:
                for peer in self.peers:
                    if self.ledger.get(peer.key) is None and not self.conns.backing_off(peer.key):
                        nursery.start_soon(self.manager.ensure_agreement, peer.key)

    async def _ask(self, key: bytes) -> None:
        try:
            reply = await self.conns.call(key, "ShareNewPeers", {"max": 64}, timeout=10)
        except (PeerUnavailable, RpcError) as exc:
            log.debug("asking %s for peers failed: %s", encode_peer_id(key)[:12], exc)
            return
        learned = 0
        for item in reply["peers"]:
            other, addr = item["id"], item["addr"]
            if other == self.peers.self_key or other in self.peers:
                continue
            if len(self.peers) >= self.policy.target:
                break
            self.peers.add(other, addr, referrer=key)
            learned += 1
        if learned:
            log.info("learned %d peers from %s", learned, encode_peer_id(key)[:12])

    def forget_stale(self) -> None:
        """Drop peers unseen for long that we have no agreement with."""
        cutoff = time.time() - self.policy.forget_after
        for peer in self.peers:
            seen = peer.last_seen or peer.first_seen
            if seen < cutoff and self.ledger.get(peer.key) is None:
                log.info(
                    "forgetting peer %s (unseen since %s)",
                    encode_peer_id(peer.key)[:12],
                    time.ctime(seen),
                )
                self.peers.forget(peer.key)
