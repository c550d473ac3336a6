"""Meeting peers: dial an address, learn who is there, and make a storage agreement.

Agreements are sized from what this node donates: each one offers
``donate / 2N`` bytes (so hosting for the 2N partners discovery aims for fits
the donation) and asks the same amount back. A node that only donates space
(``fluidfs serve``) has nothing to store, so it accepts agreements but proposes
none. A bootstrap address that cannot be reached is retried
with back-off until it answers. With a storage provider (peers/provider.py) our side of
each agreement we propose is reserved there first and held there (``store_at``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import DEFAULT_TERM, Ledger, TermsPolicy
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.provider import ProviderClient

log = logging.getLogger(__name__)

RETRY_MIN = 0.5
RETRY_MAX = 30.0
RECONNECT_PARALLEL = 16


def _ignore(_key: bytes) -> None:
    pass


@dataclass
class PeerManager:
    """Adds peers and keeps agreements with them.

    *on_new_agreement* is called with the peer's key once an agreement we proposed is
    in place (our shards can go there).
    """

    conns: Connections
    peers: PeerList
    ledger: Ledger
    _: KW_ONLY
    donate: int
    agreement_size: int
    term: int = DEFAULT_TERM
    propose: bool = True
    terms: TermsPolicy = field(default_factory=TermsPolicy)
    on_new_agreement: Callable[[bytes], None] = _ignore
    provider: ProviderClient | None = None  # holds our side of the agreements we propose

    async def add(self, addr: str, expected: bytes | None = None) -> tuple[bytes, bool]:
        """Connect to *addr*, record the peer, and propose an agreement if there is none.

        With *expected* (an invite code's peer id) only a node proving that identity is
        met there. Returns (peer key, whether an agreement is in place). Raises
        PeerUnavailable.
        """
        conn = await self.conns.connect(addr, expected=expected)
        key = conn.peer_key
        if key == self.peers.self_key:
            raise PeerUnavailable(f"{addr} is this node itself")
        self.peers.add(key, addr)
        self.peers.seen(key, addr)
        if self.conns.listen_addr:  # let it know where to call us back
            try:
                await self.conns.call(key, "Ping", {"addr": self.conns.listen_addr}, timeout=10)
            except (PeerUnavailable, RpcError) as exc:
                log.info("greeting %s failed: %s", _short(key), exc)
        return key, await self.ensure_agreement(key)

    async def add_via(self, relay_addr: str, key: bytes) -> tuple[bytes, bool]:
        """``add`` for a peer nobody can dial: reach *key* through the relay at
        *relay_addr* (the handshake pins *key*); record it without an address."""
        if key == self.peers.self_key:
            raise PeerUnavailable("that is this node itself")
        await self.conns.connect_via(relay_addr, key)
        self.peers.add(key)
        self.peers.seen(key)
        return key, await self.ensure_agreement(key)

    async def ensure_agreement(self, key: bytes) -> bool:
        """Propose an agreement to *key* unless one exists; True if one is in place."""
        existing = self.ledger.get(key)
        if existing is not None:
            return existing.active
        if not self.propose:
            return False
        if wait := self.peers.caught_left(key):
            log.info("not proposing to %s: caught serving a corrupt shard (%.0f s more)",
                     _short(key), wait)
            return False
        size = self.agreement_size
        if self.ledger.promised_by_us() + size > self.donate:
            log.info("not proposing to %s: our donation is fully promised", _short(key))
            return False
        args = {"offer": size, "ask": size, "term": self.term}
        if self.conns.listen_addr:
            args["addr"] = self.conns.listen_addr
        provider = self.provider
        if provider is not None and (provider.key == key or provider.gone):
            provider = None  # never at itself; and a vanished one holds nothing new
        if provider is not None:
            if not await provider.reserve(key, size):
                return False  # no space held for it: proposing would promise what we lack
            args["store_at"] = provider.store_at()
        agreed = await self._propose(key, args, provider is not None)
        if provider is not None:
            if not agreed:
                await provider.unreserve(key)  # refused: the provider holds nothing for it
            elif (granted := self.ledger.live(key).we_host) < size:
                await provider.reserve(key, granted)  # a counter-proposal: hold no more
        return agreed

    async def _propose(self, key: bytes, args: dict, held: bool) -> bool:
        """Send the proposal and take the reply; True if an agreement is in place."""
        try:
            reply = await self.conns.call(key, "ProposeAgreement", args, timeout=10)
        except (PeerUnavailable, RpcError) as exc:
            log.info("proposing an agreement to %s failed: %s", _short(key), exc)
            return False
        if not reply["accepted"]:
            log.info("peer %s declined an agreement: %s", _short(key), reply.get("reason", ""))
            return False
        offer, ask, term = reply["offer"], reply["ask"], reply["term"]
        wrong = self._wrong_terms(args, offer, ask, term)
        if wrong or self.ledger.promised_by_us(excluding=key) + offer > self.donate:
            if wrong:
                log.warning("peer %s accepted with terms we did not propose (%s): declined",
                            _short(key), wrong)
                self.peers.record(key, False)
            else:
                log.info("not taking %s's terms: our donation got promised meanwhile",
                         _short(key))
            with contextlib.suppress(PeerUnavailable, RpcError):
                await self.conns.call(key, "EndAgreement", {}, timeout=10)  # its side too
            return False
        reserved_at = self.provider.key if held and self.provider else None
        self.ledger.record(key, we_host=offer, they_host=ask, term=term,
                           reserved_at=reserved_at)
        log.info("agreement with %s: we host %d bytes, it hosts %d", _short(key), offer, ask)
        self.on_new_agreement(key)
        return True

    async def take_back(self, key: bytes) -> bool:
        """Renew the live agreement with *key* without ``store_at``: our provider is gone,
        so we hold our side ourselves from now on (the peer's shards that were at the
        provider are lost to it, and its audits and repair re-create them). True if the
        peer renewed."""
        agreement = self.ledger.live(key)
        if agreement is None:
            return False
        args = {"offer": agreement.we_host, "ask": agreement.they_host,
                "term": agreement.term}
        if self.conns.listen_addr:
            args["addr"] = self.conns.listen_addr
        return await self._propose(key, args, held=False)

    async def move_to_provider(self, key: bytes) -> bool:
        """Renew the live agreement with *key* on its terms, with ``store_at`` naming our
        provider now (after switching providers, peers/handover.py). True if renewed."""
        agreement = self.ledger.live(key)
        if agreement is None or self.provider is None:
            return False
        args = {"offer": agreement.we_host, "ask": agreement.they_host,
                "term": agreement.term, "store_at": self.provider.store_at()}
        if self.conns.listen_addr:
            args["addr"] = self.conns.listen_addr
        renewed = await self._propose(key, args, held=True)
        if renewed and (granted := self.ledger.live(key).we_host) < args["offer"]:
            await self.provider.reserve(key, granted)  # it granted less: hold no more
        return renewed

    def _wrong_terms(self, proposed: dict, offer: int, ask: int, term: int) -> str:
        """Why accepted terms are not ones we can take ('' if they are)."""
        if offer > proposed["offer"]:
            return f"we would host {offer} bytes, more than the {proposed['offer']} offered"
        if not self.terms.min_bytes <= ask <= proposed["ask"]:
            return f"it would host {ask} bytes, not {self.terms.min_bytes}..{proposed['ask']}"
        if offer * proposed["ask"] > proposed["offer"] * ask:
            return f"{offer} for {ask} is a worse ratio than proposed"
        if term > proposed["term"]:
            return f"term {term} s is longer than the {proposed['term']} s proposed"
        return ""

    async def bootstrap(self, addr: str) -> None:
        """Keep trying *addr* until it is added (run as a background task)."""
        delay = RETRY_MIN
        while True:
            try:
                await self.add(addr)
                return
            except (PeerUnavailable, ValueError) as exc:
                log.info("bootstrap peer %s: %s (retrying in %.1f s)", addr, exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def reconnect_known(self) -> None:
        """Say hello to every known peer with an address (after a restart), so they can
        call us back; at most RECONNECT_PARALLEL dials at a time."""
        slots = trio.Semaphore(RECONNECT_PARALLEL)

        async def hello(key: bytes) -> None:
            args = {"addr": self.conns.listen_addr} if self.conns.listen_addr else {}
            async with slots:
                try:
                    await self.conns.call(key, "Ping", args, timeout=5)
                except (PeerUnavailable, RpcError, ValueError) as exc:
                    log.debug("hello to %s failed: %s", _short(key), exc)
                    return
            await self.ensure_agreement(key)

        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                if peer.addr:
                    nursery.start_soon(hello, peer.key)


def _short(key: bytes) -> str:
    return encode_peer_id(key)[:12]
