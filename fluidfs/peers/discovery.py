"""Discovery: from a few known peers, find enough of the network (the seed's ShareNewPeers).

While fewer than ``target`` peers are known, ask a few of the known ones for
theirs every ``fast`` seconds; once there are enough, keep asking every
``slow`` seconds so the list stays fresh. Peers without an agreement are offered
one (a peer that declines or cannot be reached is asked again only after a growing
pause); peers unseen for ``forget_after`` seconds that we have no agreement with are
forgotten.

What peers tell us (``ShareNewPeers`` answers, ``Ping`` addresses) are claims: they wait
in the peer list's candidate table until a handshake at the claimed address proves the
claimed identity. Those verification dials are what a stranger could aim at a victim, so
they are bounded (docs/protocol.md §5):

- a token bucket: ``dial_burst`` dials at once, then one every ``dial_interval`` s;
- at most ``verify_parallel`` at a time, each given up after ``VERIFY_TIMEOUT`` s;
- an address is dialled at most once per ``retry_after`` s, whoever names it, and never
  again after ``max_failures`` dials where no fluidfs peer answered (while remembered:
  the last ``TRIED_MEMORY`` addresses dialled); one address is never dialled twice at once;
- an address where a different identity answered is a live peer's: the claim is
  dropped and the address not held against that peer (its own claim is admitted
  without a second dial); a third party cannot name a known peer's address for another.

A verified peer becomes a row (it remembers who referred it, for referral trust) if the
table has room; see peers/peerlist.py for its cap and eviction.

A ``ShareNewPeers`` answer may carry peers' signed address records: a valid record newer
than the one held moves a known peer's row to its new address at once (the signature is
the peer's own, so no verification dial is needed; peers/addrrecord.py). A record whose
bytes are those of the one held is skipped unread: it can change nothing, and answers
repeat the same records every round.

While this node needs a relay (``wants_relays``: nobody can dial it, it was given none
and holds fewer than two, peers/relayclient.py), discovery looks for relays: it asks
every ``RELAY_LOOK`` seconds at least, and a peer whose own signed record says it relays
is claimed even once the table holds ``target`` peers (at most ``RELAY_CLAIMS`` per
answer; verified like any claim, and the table's cap still holds). Its record is kept,
so once verified the relay client knows it for a relay.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import ChannelError, RpcError
from fluidfs.net.tcp import dial
from fluidfs.peers.address import AddressError, PeerAddr
from fluidfs.peers.addrrecord import AddressBook, RecordError, learn, read_record
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.peerlist import Candidate, PeerList

log = logging.getLogger(__name__)

TRIED_MEMORY = 4096  # addresses remembered after a verification dial
VERIFY_TICK = 0.25  # seconds between looks at the candidate table
PROPOSE_RETRY_MIN = 5.0  # a declined or failed proposal is repeated after this, doubling
VERIFY_TIMEOUT = 5.0  # connect and handshake of one verification dial
PROPOSE_RETRY_MAX = 3600.0
RELAY_LOOK = 5.0  # seconds between rounds at most, while this node needs a relay
RELAY_CLAIMS = 4  # relays claimed from one answer beyond the target


@dataclass
class DiscoveryPolicy:
    """How eagerly to look for peers, and how hard a stranger may make us dial."""

    target: int = 24  # default 2N
    fast: float = 1.0
    slow: float = 30.0
    fanout: int = 3  # peers asked per round
    forget_after: float = 7 * 24 * 3600
    table_factor: int = 4  # rows admitted on a peer's word: at most this x target
    dial_burst: int = 16  # verification dials at once ...
    dial_interval: float = 10.0  # ... then one per this many seconds
    verify_parallel: int = 8
    retry_after: float = 600.0  # an address that failed once may be tried again after this
    max_failures: int = 2  # ... and is given up after this many failures


@dataclass
class Tried:
    """The last verification dial to one address."""

    failures: int = 0  # dials where no fluidfs peer answered
    at: float = 0.0  # trio clock of the last dial
    answered: bytes | None = None  # who completed the handshake there last time
    wall_ms: int = 0  # Unix milliseconds of the last dial


class TokenBucket:
    """``burst`` tokens, refilled at one per ``interval`` seconds (trio's clock)."""

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self.tokens = float(burst)
        self.at = trio.current_time()

    def _refill(self) -> None:
        now = trio.current_time()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) / self.interval)
        self.at = now

    def ready(self) -> bool:
        """True if a token is available now."""
        self._refill()
        return self.tokens >= 1.0

    def take(self) -> None:
        """Spend one token (check ``ready`` first)."""
        self._refill()
        self.tokens -= 1.0


class Discovery:
    """Keeps the peer list filled."""

    def __init__(
        self,
        conns: Connections,
        peers: PeerList,
        ledger: Ledger,
        manager: PeerManager,
        policy: DiscoveryPolicy,
        addresses: AddressBook | None = None,
        wants_relays: Callable[[], bool] = lambda: False,
    ) -> None:
        """*wants_relays*: True while this node needs a relay (relayclient.py)."""
        self.conns = conns
        self.wants_relays = wants_relays
        self.addresses = addresses if addresses is not None else AddressBook()
        self.peers = peers
        self.ledger = ledger
        self.manager = manager
        self.policy = policy
        peers.capacity = policy.table_factor * policy.target
        peers.keep = lambda key: ledger.get(key) is not None
        self._tried: OrderedDict[PeerAddr, Tried] = OrderedDict()  # oldest first
        self._in_flight: set[PeerAddr] = set()
        self._proposed: dict[bytes, tuple[float, float]] = {}  # key -> (next try, pause)
        self._bucket: TokenBucket | None = None
        self.verified = 0  # claims proven by a handshake (for status and tests)

    async def run(self) -> None:
        """Discover until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.verify_claims)
            while True:
                wanting = len(self.peers) < self.policy.target
                await self.round()
                self.forget_stale()
                pause = self.policy.fast if wanting else self.policy.slow
                if self.wants_relays():
                    pause = min(pause, RELAY_LOOK)
                await trio.sleep(pause)

    async def round(self) -> None:
        """Ask a few known peers for theirs, and offer agreements where there are none."""
        reachable = [p.key for p in self.peers if p.addr and not self.conns.backing_off(p.key)]
        random.shuffle(reachable)
        async with trio.open_nursery() as nursery:
            for key in reachable[: self.policy.fanout]:
                nursery.start_soon(self._ask, key)
        if self.manager.propose:
            now = trio.current_time()
            async with trio.open_nursery() as nursery:
                for peer in self.peers:
                    if (
                        self.ledger.get(peer.key) is None
                        and not self.conns.backing_off(peer.key)
                        and self._proposed.get(peer.key, (0.0, 0.0))[0] <= now
                    ):
                        nursery.start_soon(self._propose, peer.key)

    async def _propose(self, key: bytes) -> None:
        if await self.manager.ensure_agreement(key):
            self._proposed.pop(key, None)
            return
        _, pause = self._proposed.get(key, (0.0, PROPOSE_RETRY_MIN / 2))
        pause = min(pause * 2, PROPOSE_RETRY_MAX)
        self._proposed[key] = (trio.current_time() + pause, pause)

    async def _ask(self, key: bytes) -> None:
        try:
            reply = await self.conns.call(key, "ShareNewPeers", {"max": 64}, timeout=10)
        except (PeerUnavailable, RpcError) as exc:
            log.debug("asking %s for peers failed: %s", _short(key), exc)
            return
        moved = self._learn_records(key, reply["peers"])
        if moved:
            log.info("peer %s told us of %d peers' new addresses", _short(key), moved)
        claimed = unusable = 0
        for item in reply["peers"]:
            if len(self.peers) >= self.policy.target:
                break
            other = item["id"]
            if other == self.peers.self_key or other in self.peers.candidates:
                continue
            known = self.peers.get(other)
            if known is not None and known.addr:
                continue
            try:
                addr = PeerAddr.parse(item["addr"])
            except AddressError:
                unusable += 1
                continue
            self.peers.claim(other, addr, source=key)
            claimed += 1
        if self.wants_relays():
            claimed += self._claim_relays(key, reply["peers"])
        if unusable:
            log.info("peer %s named %d unusable addresses", _short(key), unusable)
        if claimed:
            log.info("%d peers to verify, named by %s", claimed, _short(key))

    def _claim_relays(self, source: bytes, items: list[dict]) -> int:
        """Claim the peers among *items* we have no address for whose own signed record
        says they relay (past the target: this node needs one), keeping the record.
        Returns how many were claimed."""
        claimed = 0
        for item in items:
            other, raw = item["id"], item.get("record")
            if raw is None or other == self.peers.self_key or other in self.peers.candidates:
                continue
            known = self.peers.get(other)
            if known is not None and known.addr:
                continue  # its record was offered with the others (_learn_records)
            try:
                record = read_record(raw, expected=other)
            except RecordError:
                continue
            if not record.relay or not record.addrs:
                continue
            self.addresses.offer(record)
            self.peers.claim(other, record.addrs[0], source=source)
            claimed += 1
            if claimed >= RELAY_CLAIMS:
                break
        return claimed

    def _learn_records(self, source: bytes, items: list[dict]) -> int:
        """Signed address records of peers we know, passed on by *source*: the newest
        moves its peer's row (peers/addrrecord.py). Returns how many rows moved."""
        moved = 0
        for item in items:
            raw = item.get("record")
            if raw is None or item["id"] not in self.peers:
                continue
            if self.addresses.holds(item["id"], raw):
                # The record we hold, passed back to us: peers share the same records in
                # every answer, and checking a signature is most of a round's CPU.
                continue
            try:
                record = read_record(raw, expected=item["id"])
            except RecordError as exc:
                log.info("peer %s passed on a bad address record: %s", _short(source), exc)
                continue
            moved += learn(self.peers, self.addresses, record, source)
        return moved

    # --- verifying claims ------------------------------------------------------------------

    def _remember(self, addr: PeerAddr, answered: bytes | None) -> None:
        failures = self._tried.pop(addr, Tried()).failures
        self._tried[addr] = Tried(failures + (answered is None), trio.current_time(), answered,
                                  int(time.time() * 1000))
        while len(self._tried) > TRIED_MEMORY:
            self._tried.popitem(last=False)

    def _decide(self, claim: Candidate) -> str:
        """"dial", "admit" (a recent handshake there proved this identity) or "drop"."""
        addr, text = claim.addr, str(claim.addr)
        if text == self.conns.listen_addr or addr in self._in_flight:
            return "drop"
        known = self.peers.get(claim.key)
        if known is not None and known.addr == text:
            return "drop"
        if claim.key not in claim.sources and any(
            p.addr == text and p.key != claim.key for p in self.peers
        ):
            return "drop"  # a third party naming a known peer's address for someone else
        tried = self._tried.get(addr)
        if tried is not None:
            if tried.answered == claim.key:
                return "admit"
            recent = trio.current_time() - tried.at < self.policy.retry_after
            if (recent or tried.failures >= self.policy.max_failures) and \
                    not self._signed_since(claim, tried):
                return "drop"
        if known is None and not self.peers.has_room():
            return "drop"
        return "dial"

    def _signed_since(self, claim: Candidate, tried: Tried) -> bool:
        """True if the peer itself signed this address after our last dial there failed
        (a port mapping it got since: try once more). Each retry needs a newer record
        from the peer and a token from the dial bucket."""
        record = self.addresses.get(claim.key)
        return (claim.key in claim.sources and record is not None
                and claim.addr in record.addrs and record.time > tried.wall_ms)

    async def verify_claims(self) -> None:
        """Dial claimed addresses, within the dial budget, to prove who is there."""
        self._bucket = TokenBucket(self.policy.dial_burst, self.policy.dial_interval)
        async with trio.open_nursery() as nursery:
            while True:
                while len(self._in_flight) < self.policy.verify_parallel and self._bucket.ready():
                    claim = self.peers.candidates.take()
                    if claim is None:
                        break
                    decision = self._decide(claim)
                    if decision == "admit":
                        nursery.start_soon(self._admit, claim)
                    elif decision == "dial":
                        self._bucket.take()
                        self._in_flight.add(claim.addr)
                        nursery.start_soon(self._verify, claim)
                await trio.sleep(VERIFY_TICK)

    async def _verify(self, claim: Candidate) -> None:
        try:
            answered = await self._who_answers(claim.addr)
        finally:
            self._in_flight.discard(claim.addr)
        self._remember(claim.addr, answered)
        if answered is None:
            log.info("no peer answers at %s (claimed for %s)", claim.addr, _short(claim.key))
        elif answered != claim.key:
            log.info("%s is %s, not %s as claimed", claim.addr, _short(answered),
                     _short(claim.key))
        else:
            await self._admit(claim)

    async def _admit(self, claim: Candidate) -> None:
        referrers = [s for s in claim.sources if s != claim.key and s in self.peers]
        peer = self.peers.admit(claim.key, claim.addr, referrers[0] if referrers else None)
        if peer is not None:
            self.verified += 1
            log.info("verified peer %s at %s", _short(claim.key), claim.addr)
            await self.peers.flush()

    async def _who_answers(self, addr: PeerAddr) -> bytes | None:
        """The identity that completes a handshake at *addr*, or None.

        No ``expected_peer``: a different identity answering tells us the address is a
        live peer's (not a victim's), which we must not hold against it.
        """
        try:
            channel = await dial(addr.host, addr.port, self.conns.identity, None,
                                 timeout=VERIFY_TIMEOUT)
        except (ChannelError, OSError):
            return None
        try:
            return channel.peer_key
        finally:
            await channel.aclose()

    def forget_stale(self) -> None:
        """Drop peers unseen for long that we have no agreement with."""
        cutoff = time.time() - self.policy.forget_after
        for peer in self.peers:
            seen = peer.last_seen or peer.first_seen
            if (seen < cutoff and self.ledger.get(peer.key) is None
                    and not self.peers.caught_left(peer.key)):  # a liar is remembered
                log.info("forgetting peer %s (unseen since %s)", _short(peer.key),
                         time.ctime(seen))
                self.peers.forget(peer.key)
                self._proposed.pop(peer.key, None)


def _short(key: bytes) -> str:
    return encode_peer_id(key)[:12]
