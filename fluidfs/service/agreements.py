"""Agreement RPCs: the terms we grant a proposer, and ends the peer decides.

Rules (limits and reasons in docs/protocol.md §5):

- Offer and ask must each be at least the minimum terms; we never host more than
  ``ratio`` times what the proposer hosts for us, nor more than a trust-scaled share of
  ``donate`` for one peer (a larger ask is counter-proposed down to it, at the proposer's
  ratio).
- All we promise together stays within the donation, and within what the disk can hold
  for peers: its room less ``PEER_RESERVE`` (diskspace.py), plus what peers' shards take
  already. A smaller disk than the donation says lowers the grants; it never ends or
  shrinks an agreement until it is renewed.
- A peer whose trust fell below the floor, or whose agreement we ended less than a
  cool-down ago, is refused.
- New agreements are granted at a bounded rate (a token bucket, taken before anything
  is awaited, so concurrent proposals cannot share one grant) and up to a bounded count:
  ended agreements that hold nothing are forgotten, and live ones idle and empty are
  ended, to make room.
- Renewing a live agreement changes its terms, never its running failure clock. A
  partner whose side was at a provider may renew without ``store_at`` (taking its side
  home) on the terms it already has, even with trust below the floor.
- A new agreement that follows an ended one does not adopt the shards kept from the
  old one: they are marked unclaimed, and dropped when the old agreement's keep period
  ends unless the owner stores, retrieves or audits them meanwhile (peers/lifecycle.py).
- A node whose side is held by a storage provider (``mount --provider``) declines new
  proposals: it would have to host on the machine that goes offline; it proposes itself,
  with ``store_at`` (docs/federation.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from fluidfs.diskspace import PEER_RESERVE, DiskReserve
from fluidfs.peers.address import AddressError, PeerAddr
from fluidfs.peers.agreements import Ledger, TermsPolicy
from fluidfs.peers.peerlist import ORIGIN_PEER, PeerList
from fluidfs.service.discovery import claimed_addr, note_claim
from fluidfs.service.ops import Args, Op, Reply
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

log = logging.getLogger(__name__)

MARK_BATCH = 2000  # shards marked unclaimed per write transaction


@dataclass
class GrantBucket:
    """Grants for new agreements: a burst of ``per_hour``, refilled at ``per_hour`` an hour.

    Time is ``trio.current_time()`` (monotonic; a test's MockClock moves it).
    """

    per_hour: int
    tokens: float = field(init=False)
    _at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.per_hour)

    def take(self) -> bool:
        """Take one grant if there is one."""
        now = trio.current_time()
        if self._at is not None:
            refill = (now - self._at) * self.per_hour / 3600.0
            self.tokens = min(float(self.per_hour), self.tokens + refill)
        self._at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def give_back(self) -> None:
        """Return a grant taken for a proposal that was refused after all."""
        self.tokens = min(float(self.per_hour), self.tokens + 1)


@dataclass
class AgreementOps:
    """Answers ProposeAgreement and EndAgreement."""

    ledger: Ledger
    peers: PeerList
    shards: ShardStore
    records: RecordStore | None  # records we keep for peers go with their agreement
    limiter: trio.CapacityLimiter
    on_end: Callable[[bytes], None]  # an agreement ended: our shards there no longer count
    donate: int
    ratio: float
    terms: TermsPolicy
    cooldown: float
    reserve: DiskReserve  # the state disk's: what we promise must fit on it
    proposes_only: bool = False  # our side is at a provider: we propose, never accept new
    grants: GrantBucket = field(init=False)

    def __post_init__(self) -> None:
        self.grants = GrantBucket(self.terms.new_per_hour)

    def ops(self) -> dict[str, Op]:
        """The ops served here, by wire name."""
        return {"ProposeAgreement": self.propose, "EndAgreement": self.end}

    async def propose(self, peer: bytes, args: Args) -> Reply:
        """Grant the proposed terms, smaller ones, or refuse with a reason."""
        offer, ask, term = args["offer"], args["ask"], args["term"]
        addr = claimed_addr(args)
        live = self.ledger.live(peer)
        renewal = live is not None
        granted, reason = self._terms_for(peer, offer, ask, self._room_for_peers())
        if live is not None and live.store_at_id is not None and "store_at" not in args:
            # Its provider vanished and it takes its side home: on the terms we already
            # granted, whatever its trust now (its failure clock keeps running).
            granted, reason = (min(offer, live.they_host), min(ask, live.we_host)), None
        if reason is None and self.proposes_only and not renewal:
            reason = "this node's side is held by a storage provider: it proposes to you itself"
        store_at = None
        if reason is None and "store_at" in args:
            store_at, reason = self._store_at(peer, args["store_at"])
        if reason is None and not renewal:
            reason = await self._room_for_new(peer)
        if reason is not None:
            log.info("declined an agreement with %s: %s", peer.hex()[:12], reason)
            return {"accepted": False, "offer": offer, "ask": ask, "term": term, "reason": reason}
        if peer not in self.peers:
            self.peers.add(peer, origin=ORIGIN_PEER)  # its address once verified
        note_claim(self.peers, peer, addr)
        offer, ask = granted
        # The proposer's "ask" is what we host; its "offer" is what it hosts for us.
        agreement = self.ledger.record(
            peer, we_host=ask, they_host=offer, term=term, store_at=store_at
        )
        if not renewal and agreement.unclaimed_since is not None:
            await self._mark_unclaimed(peer)
        return {"accepted": True, "offer": offer, "ask": ask, "term": term}

    async def _mark_unclaimed(self, peer: bytes) -> None:
        """Mark every shard kept from the peer's ended agreement unclaimed, in batches."""
        after: bytes | None = b""
        while after is not None:
            after = await trio.to_thread.run_sync(
                self.shards.mark_unclaimed, peer, after, MARK_BATCH, limiter=self.limiter
            )

    async def end(self, peer: bytes, args: Args) -> Reply:
        """The peer ends our agreement (no cool-down: it was not its failure)."""
        agreement = self.ledger.mark_ended(peer, notified=True)
        if agreement is not None:
            log.info("peer %s ended our agreement", peer.hex()[:12])
            self.on_end(peer)
        return {"ended": agreement is not None}

    def _store_at(self, peer: bytes, where: Args) -> tuple[tuple[bytes, str] | None, str | None]:
        """The provider a proposer's side is held at, parsed; or why we refuse it."""
        provider = where["id"]
        if provider in (peer, self.peers.self_key):
            return None, "store_at must name a third node: the proposer's provider"
        try:
            addr = str(PeerAddr.parse(where["addr"]))
        except AddressError as exc:
            return None, f"store_at address: {exc}"
        return (provider, addr), None

    def _room_for_peers(self) -> int:
        """Bytes the disk can hold for all peers together: its room less PEER_RESERVE,
        plus what their shards take already. On the loop: a statvfs and a read of the
        usage table (a row per owner, as bounded as the agreements). A worker-thread hop
        here let the proposer's next request (its lease's ``PutRecord``) overtake the
        agreement and be refused ``no_agreement``."""
        held = sum(n for key, n in self.shards.owners().items() if key != self.peers.self_key)
        free = self.reserve.room_for(self.shards.data_file)
        return max(0, free - PEER_RESERVE) + held

    def _terms_for(
        self, peer: bytes, offer: int, ask: int, room: int
    ) -> tuple[tuple[int, int], str | None]:
        """The (offer, ask) we would grant *peer* with *room* bytes of disk for all
        peers (``_room_for_peers``), or a reason to refuse."""
        terms = self.terms
        if offer < terms.min_bytes or ask < terms.min_bytes:
            return (0, 0), f"below the minimum terms: offer and ask of {terms.min_bytes} bytes"
        if ask > self.ratio * offer:
            return (0, 0), f"asks {ask} bytes for {offer} offered (ratio limit {self.ratio})"
        if ask > self.donate:
            return (0, 0), f"asks more than this node's whole donation: no space ({self.donate})"
        wait = self.ledger.in_cooldown(peer, self.cooldown)
        if wait:
            return (0, 0), f"we ended our agreement for failures; refused for another {wait:.0f} s"
        if wait := self.peers.caught_left(peer):
            return (0, 0), f"you served us a corrupt shard; refused for another {wait:.0f} s"
        known = self.peers.get(peer)
        initial = self.peers.policy.initial or 1.0
        factor = (known.trust if known is not None else initial) / initial
        if factor < terms.min_trust:
            return (0, 0), "trust too low after failures"
        left = min(self.donate, room) - self.ledger.promised_by_us(excluding=peer)
        granted_ask = min(ask, terms.cap(self.donate, factor), left)
        if granted_ask < terms.min_bytes:
            return (0, 0), "no space left to promise"
        # A counter-proposal keeps the proposer's ratio (rounding in its favour).
        return (offer * granted_ask // ask, granted_ask), None

    async def _room_for_new(self, peer: bytes) -> str | None:
        """Take a grant for a new agreement and make room for it; or why not."""
        if not self.grants.take():
            return f"too many new agreements (at most {self.terms.new_per_hour} an hour); try later"
        try:
            reason = await self._make_room(peer)
        except BaseException:
            self.grants.give_back()
            raise
        if reason is not None:
            self.grants.give_back()
        return reason

    async def _make_room(self, peer: bytes) -> str | None:
        """Forget or end agreements that hold nothing until a new one fits the bounds."""
        terms = self.terms
        live = len(self.ledger.active())
        ended = len(self.ledger) - live
        if live < terms.max_agreements and ended < terms.max_ended:
            return None
        held = await trio.to_thread.run_sync(self.shards.owners, limiter=self.limiter)
        if ended >= terms.max_ended:
            for key in self.ledger.evictable(held, ended=True)[: ended - terms.max_ended + 1]:
                await self._forget(key, "to remember newer ones")
            if len(self.ledger.ended()) >= terms.max_ended:  # all still hold shards
                return "too many ended agreements still being cleaned up; try later"
        if live >= terms.max_agreements:
            idle = self.ledger.clock() - terms.idle_grace
            evictable = [k for k in self.ledger.evictable(held, ended=False, idle_since=idle)
                         if k != peer]
            if not evictable:
                return f"this node keeps at most {terms.max_agreements} agreements"
            await self._end_idle(evictable[0])
        if len(self.ledger.active()) >= terms.max_agreements:  # taken while we evicted
            return f"this node keeps at most {terms.max_agreements} agreements"
        return None

    async def _end_idle(self, key: bytes) -> None:
        """End a live agreement that holds nothing either way, to make room.

        The peer is told by the lifecycle (``EndAgreement``) like after any end we decide;
        this is no failure of the peer's, so no cool-down applies.
        """
        log.info("ending the idle agreement with %s to make room for a new peer", key.hex()[:12])
        if self.ledger.mark_ended(key) is not None:
            self.on_end(key)
        await self._drop_records(key)

    async def _forget(self, key: bytes, why: str) -> None:
        """Drop an agreement that holds nothing, with any records we keep for it."""
        if self.ledger.get(key) is None:
            return
        log.info("forgetting the agreement with %s: %s", key.hex()[:12], why)
        self.ledger.end(key)
        await self._drop_records(key)

    async def _drop_records(self, key: bytes) -> None:
        if self.records is not None:
            await trio.to_thread.run_sync(self.records.delete, key, limiter=self.limiter)
