"""The peer list: every peer we know, where to reach it, and how it has behaved.

Stored in ``meta.lmdb`` (format version 3):

- table ``peers``: key ``public key(32)`` → CBOR map
  ``{"v": 3, "index": int, "addr": str, "first_seen": float, "last_seen": float,
  "referrer": bytes | None, "trust": float, "ok": int, "fail": int, "origin": str,
  "caught": float}``.
  ``addr`` is ``""`` or a ``PeerAddr`` in canonical text form (peers/address.py).
  ``origin`` is ``"ours"`` (a peer this node chose: bootstrap, ``peers add``, its own
  root record, its own block records) or ``"peer"`` (admitted on a peer's word: a claim
  verified by a handshake, or a proposal we accepted). Version 1 rows (no ``origin``)
  read as ``"ours"``. ``caught`` is the wall-clock time this peer was last caught
  serving a corrupt shard of ours, 0 if never (peers/trust.py: for ``caught_for`` after
  it, trust grows slowly and no agreement is made with it); version 1 and 2 rows (no
  ``caught``) read as 0.
- table ``peer_index``: ``u32 index`` → public key. Index 0 is this node; block
  records name shard holders by these small indexes instead of 32-byte keys. An index is
  never reused and a key keeps its index when it is forgotten and learned again.

A row that cannot be read (bad CBOR, unknown version, wrong types, an index taken by
another key) is skipped with one log line; a row whose address does not parse is kept
without its address. Neither is fatal.

Bounds (docs/protocol.md §5): rows admitted on a peer's word that have no agreement are
at most ``capacity`` (set by discovery: 4 x its target); a newcomer past that replaces the
least useful such row, or is refused when every one is more useful than it. Claims about
addresses (``Ping``, ``ShareNewPeers``) never become rows directly: they wait in the
bounded in-memory ``Candidates`` table until discovery verifies them by a handshake.

Writes: a new index is written at once (block records may name it right away, so it must
never be lost and reused); every other change (addresses, last-seen times, trust,
evictions) is batched and written by ``flush`` in a worker thread: every few seconds, and
right after discovery verified an address (so a verified address survives ``kill -9``),
or by ``save_all`` at exit.
"""

from __future__ import annotations

import logging
import math
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import cbor2
import trio

from fluidfs.peers.address import AddressError, PeerAddr
from fluidfs.peers.trust import DEFAULT_POLICY, TrustPolicy
from fluidfs.store.db import Database

log = logging.getLogger(__name__)

VERSION = 3
SELF_INDEX = 0
MAX_INDEX = 2**32 - 1
ORIGIN_OURS = "ours"
ORIGIN_PEER = "peer"
_ORIGINS = {ORIGIN_OURS, ORIGIN_PEER}
_U32 = struct.Struct(">I")
# A row that answered within this long counts as alive when choosing whom to evict.
ALIVE_WITHIN = 24 * 3600.0
# Candidates (claims not yet verified), in memory only.
MAX_CANDIDATES = 256
MAX_SOURCES = 4
CANDIDATE_TTL = 3600.0


class RowError(ValueError):
    """A stored peer row that cannot be read."""


def _number(body: dict, name: str, *, low: float = 0.0) -> float:
    value = body[name]
    if type(value) not in (int, float) or not math.isfinite(value) or value < low:
        raise RowError(f"{name} is not a finite number >= {low}: {value!r}")
    return float(value)


def _count(body: dict, name: str, low: int = 0, high: int = 2**63) -> int:
    value = body[name]
    if type(value) is not int or not low <= value <= high:
        raise RowError(f"{name} is not an integer in {low}..{high}: {value!r}")
    return value


@dataclass
class Peer:
    """One known peer."""

    key: bytes
    index: int
    addr: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    referrer: bytes | None = None
    trust: float = 1.0
    ok: int = 0
    fail: int = 0
    origin: str = ORIGIN_OURS
    caught: float = 0.0

    def encode(self) -> bytes:
        """CBOR, version 3."""
        body = asdict(self)
        del body["key"]
        return cbor2.dumps({"v": VERSION, **body})

    @classmethod
    def decode(cls, key: bytes, raw: bytes) -> tuple[Peer, str]:
        """Parse and check what encode() wrote (or a version 1 or 2 row).

        Returns the peer and, if its stored address was unusable and dropped, why.
        Raises ``RowError`` for anything else that is wrong.
        """
        if len(key) != 32:
            raise RowError(f"key of {len(key)} bytes")
        try:
            body = cbor2.loads(raw)
        except Exception as exc:  # cbor2 raises several types on garbage
            raise RowError(f"not CBOR: {exc}") from None
        if type(body) is not dict:
            raise RowError("not a map")
        version = body.get("v")
        expected = {"v", "index", "addr", "first_seen", "last_seen", "referrer", "trust",
                    "ok", "fail"}
        expected |= {"origin"} if version in (2, VERSION) else set()
        expected |= {"caught"} if version == VERSION else set()
        if version not in (1, 2, VERSION):
            raise RowError(f"unknown version {version!r}")
        if set(body) != expected:
            raise RowError(f"fields {sorted(map(str, set(body) ^ expected))} differ")
        referrer = body["referrer"]
        if referrer is not None and (type(referrer) is not bytes or len(referrer) != 32):
            raise RowError("referrer is not a 32-byte key")
        origin = body.get("origin", ORIGIN_OURS)
        if origin not in _ORIGINS:
            raise RowError(f"unknown origin {origin!r}")
        addr, dropped = body["addr"], ""
        if type(addr) is not str:
            raise RowError("addr is not text")
        if addr:
            try:
                addr = str(PeerAddr.parse(addr))
            except AddressError as exc:
                addr, dropped = "", str(exc)
        peer = cls(
            key=bytes(key),
            index=_count(body, "index", 1, MAX_INDEX),
            addr=addr,
            first_seen=_number(body, "first_seen"),
            last_seen=_number(body, "last_seen"),
            referrer=referrer,
            trust=_number(body, "trust"),
            ok=_count(body, "ok"),
            fail=_count(body, "fail"),
            origin=origin,
            caught=_number(body, "caught") if "caught" in body else 0.0,
        )
        return peer, dropped


@dataclass
class Candidate:
    """A claim that identity ``key`` accepts connections at ``addr``, not yet verified."""

    key: bytes
    addr: PeerAddr
    heard: float  # time.monotonic() when first heard
    sources: set[bytes] = field(default_factory=set)  # who said so (the peer itself: Ping)


class Candidates:
    """Unverified address claims: bounded, in memory only, each expiring after a while."""

    def __init__(self, limit: int = MAX_CANDIDATES, ttl: float = CANDIDATE_TTL) -> None:
        self.limit = limit
        self.ttl = ttl
        self._items: dict[bytes, Candidate] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def get(self, key: bytes) -> Candidate | None:
        """The pending claim about *key*, if any."""
        return self._items.get(key)

    def add(self, key: bytes, addr: PeerAddr, source: bytes) -> None:
        """Note that *source* says *key* listens at *addr*."""
        now = time.monotonic()
        item = self._items.get(key)
        if item is not None:
            if item.addr == addr:
                if len(item.sources) < MAX_SOURCES:
                    item.sources.add(source)
                return
            # A peer's word about itself replaces any other claim; a third party's
            # replaces only a lone third-party claim.
            if source != key and (key in item.sources or len(item.sources) > 1):
                return
        if item is None and len(self._items) >= self.limit:
            self._drop_one(now)
        self._items[key] = Candidate(key, addr, now, {source})

    def _drop_one(self, now: float) -> None:
        expired = [k for k, c in self._items.items() if now - c.heard > self.ttl]
        if expired:
            for key in expired:
                del self._items[key]
            return
        # Random among the least supported: a flood of claims cannot push out a
        # particular honest one, nor claims heard from several sources.
        fewest = min(len(c.sources) for c in self._items.values())
        del self._items[random.choice([k for k, c in self._items.items()
                                       if len(c.sources) == fewest])]

    def take(self) -> Candidate | None:
        """Remove and return the next claim to verify (most sources first, else random)."""
        now = time.monotonic()
        for key in [k for k, c in self._items.items() if now - c.heard > self.ttl]:
            del self._items[key]
        if not self._items:
            return None
        most = max(len(c.sources) for c in self._items.values())
        key = random.choice([k for k, c in self._items.items() if len(c.sources) == most])
        return self._items.pop(key)

    def discard(self, key: bytes) -> None:
        """Forget the claim about *key*."""
        self._items.pop(key, None)


class PeerList:
    """Known peers, persisted, with an in-memory copy for fast placement decisions."""

    def __init__(self, db: Database, self_key: bytes, policy: TrustPolicy = DEFAULT_POLICY) -> None:
        self.db = db
        self.self_key = self_key
        self.policy = policy
        self._peers_db = db["peers"]
        self._index_db = db["peer_index"]
        self.peers: dict[bytes, Peer] = {}
        self.by_index: dict[int, bytes] = {SELF_INDEX: self_key}
        self._index_of: dict[bytes, int] = {self_key: SELF_INDEX}
        self.candidates = Candidates()
        # Rows admitted on a peer's word without an agreement: at most this many.
        self.capacity: int | None = None
        self.keep: Callable[[bytes], bool] = lambda _key: False  # e.g. has an agreement
        self._dirty: set[bytes] = set()
        self._deleted: set[bytes] = set()
        self._unwritten_index: dict[int, bytes] = {}
        self._flush_lock = trio.Lock()
        self._load()
        self._next_index = max(self.by_index) + 1

    def _load(self) -> None:
        skipped = dropped = 0
        with self.db.read() as txn:
            for raw_index, key in txn.cursor(db=self._index_db):
                key = bytes(key)
                if len(raw_index) != 4 or len(key) != 32 or key in self._index_of:
                    log.warning("skipping an unreadable peer index row")
                    continue
                (index,) = _U32.unpack(raw_index)
                if index != SELF_INDEX:
                    self.by_index[index] = key
                    self._index_of[key] = index
            for key, raw in txn.cursor(db=self._peers_db):
                try:
                    peer, why = Peer.decode(bytes(key), bytes(raw))
                    if peer.key == self.self_key:
                        raise RowError("that is this node's own identity")
                    owner = self.by_index.get(peer.index, peer.key)
                    if owner != peer.key or self._index_of.get(peer.key, peer.index) != peer.index:
                        raise RowError(f"index {peer.index} belongs to another key")
                except RowError as exc:
                    skipped += 1
                    log.warning("skipping unreadable peer row %s: %s", bytes(key).hex()[:16], exc)
                    continue
                if why:
                    dropped += 1
                    log.warning("peer %s: dropped its address (%s)", peer.key.hex()[:12], why)
                    self._dirty.add(peer.key)
                self.peers[peer.key] = peer
                if peer.index not in self.by_index:
                    self.by_index[peer.index] = peer.key
                    self._index_of[peer.key] = peer.index
                    self._unwritten_index[peer.index] = peer.key
        if skipped or dropped:
            log.warning("peer table: %d rows skipped, %d addresses dropped", skipped, dropped)

    def __contains__(self, key: bytes) -> bool:
        return key in self.peers

    def __len__(self) -> int:
        return len(self.peers)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self.peers.values()))

    def get(self, key: bytes) -> Peer | None:
        """The peer with this public key, or None."""
        return self.peers.get(key)

    def key_of(self, index: int) -> bytes | None:
        """Public key of the peer with this holder index."""
        return self.by_index.get(index)

    # --- learning peers ------------------------------------------------------------------

    def add(
        self,
        key: bytes,
        addr: PeerAddr | str = "",
        referrer: bytes | None = None,
        *,
        origin: str = ORIGIN_OURS,
    ) -> Peer:
        """Learn a peer this node vouches for (or refresh its address); return its record.

        For peers this node chose itself, or whose address a handshake just proved. An
        address that is not a usable ``PeerAddr`` is left out (and logged), never raised.
        Claims from peers go to ``claim`` instead.
        """
        if key == self.self_key:
            raise ValueError("that is this node's own identity")
        if len(key) != 32:
            raise ValueError("a peer key has 32 bytes")
        text = self._addr_text(key, addr)
        peer = self.peers.get(key)
        if peer is not None:
            if text and text != peer.addr:
                peer.addr = text
                self._dirty.add(key)
            return peer
        index = self._index_of.get(key)
        fresh = index is None
        if index is None:
            index = self._next_index
            self._next_index += 1
        peer = Peer(key, index, text, first_seen=time.time(), referrer=referrer,
                    trust=self.policy.initial, origin=origin)
        self.peers[key] = peer
        self.by_index[index] = key
        self._index_of[key] = index
        self._deleted.discard(key)
        if text:
            self.candidates.discard(key)
        with self.db.write() as txn:  # small; see the module docstring for why not batched
            if fresh:
                txn.put(_U32.pack(index), key, db=self._index_db)
            txn.put(key, peer.encode(), db=self._peers_db)
        return peer

    @staticmethod
    def _addr_text(key: bytes, addr: PeerAddr | str) -> str:
        if isinstance(addr, PeerAddr):
            return str(addr)
        if not addr:
            return ""
        try:
            return str(PeerAddr.parse(addr))
        except AddressError as exc:
            log.info("peer %s: not keeping address %r (%s)", key.hex()[:12], addr[:80], exc)
            return ""

    def claim(self, key: bytes, addr: PeerAddr, source: bytes) -> None:
        """*source* says *key* accepts connections at *addr* (Ping, ShareNewPeers).

        Nothing is believed yet: a claim that would teach us something waits in
        ``candidates`` until discovery verifies it. A third party cannot move a peer we
        already reach at a known address.
        """
        if key == self.self_key:
            return
        peer = self.peers.get(key)
        if peer is not None and peer.addr == str(addr):
            if source == key:
                self.seen(key)
            return
        if peer is not None and peer.addr and source != key:
            return
        self.candidates.add(key, addr, source)

    def admit(self, key: bytes, addr: PeerAddr, referrer: bytes | None = None) -> Peer | None:
        """A handshake at *addr* just proved *key*: record it there (None: no room)."""
        peer = self.peers.get(key)
        if peer is None:
            if not self._make_room(time.time()):
                return None
            peer = self.add(key, addr, referrer, origin=ORIGIN_PEER)
        elif peer.addr != str(addr):
            peer.addr = str(addr)
            self._dirty.add(key)
        self.seen(key)
        return peer

    def _evictable(self) -> list[Peer]:
        # A caught liar's row stays for its caught period: forgotten, it would come back
        # as a stranger with fresh trust.
        return [p for p in self.peers.values() if p.origin == ORIGIN_PEER
                and not self.keep(p.key) and not self.caught_left(p.key)]

    def _usefulness(self, peer: Peer, now: float) -> tuple:
        alive = now - peer.last_seen < ALIVE_WITHIN
        return (alive, peer.ok > 0, peer.trust, now - peer.first_seen)

    def _newcomer(self) -> tuple:
        """The usefulness of a stranger a handshake has just verified."""
        return (True, False, self.policy.initial, 0.0)

    def has_room(self) -> bool:
        """Whether a newly verified stranger would be admitted now."""
        if self.capacity is None:
            return True
        now = time.time()
        evictable = self._evictable()
        if len(evictable) < self.capacity:
            return True
        return min(self._usefulness(p, now) for p in evictable) < self._newcomer()

    def _make_room(self, now: float) -> bool:
        if self.capacity is None:
            return True
        evictable = self._evictable()
        if len(evictable) < self.capacity:
            return True
        worst = min(evictable, key=lambda p: self._usefulness(p, now))
        if self._usefulness(worst, now) >= self._newcomer():
            return False
        log.info("peer table full: evicting %s", worst.key.hex()[:12])
        self.forget(worst.key)
        return True

    def seen(self, key: bytes, addr: PeerAddr | str = "") -> None:
        """Note that the peer answered us just now (at *addr*, if a dial there proved it)."""
        peer = self.peers.get(key)
        if peer is not None:
            peer.last_seen = time.time()
            self._dirty.add(key)
            text = self._addr_text(key, addr) if addr else ""
            if text:
                peer.addr = text

    def referrals(self, limit: int, exclude: bytes | None = None) -> list[Peer]:
        """Peers to tell others about, best first: trusted and long known before new.

        Only rows, never unverified candidates; only peers with an address.
        """
        now = time.time()

        def score(peer: Peer) -> tuple[float, float]:
            age_hours = max(0.0, now - peer.first_seen) / 3600.0
            return (-peer.trust * (1.0 + math.log1p(age_hours)), peer.first_seen)

        known = [p for p in self.peers.values() if p.addr and p.key != exclude]
        known.sort(key=score)
        return known[:limit]

    # --- behaviour -----------------------------------------------------------------------

    def record(self, key: bytes, ok: bool) -> None:
        """Count one success or failure of the peer; pass a share to its referrer."""
        peer = self.peers.get(key)
        if peer is None:
            return
        before = peer.trust
        peer.trust = self.policy.after(peer.trust, ok, caught=self.caught_left(key) > 0)
        if ok:
            peer.ok += 1
            peer.last_seen = time.time()
        else:
            peer.fail += 1
        self._dirty.add(key)
        referrer = self.peers.get(peer.referrer) if peer.referrer else None
        if referrer is not None and referrer is not peer:
            share = self.policy.referral_share * (peer.trust - before)
            referrer.trust = self.policy.clamp(referrer.trust + share)
            self._dirty.add(referrer.key)

    def caught_left(self, key: bytes, now: float | None = None) -> float:
        """Seconds left of the peer's caught period (0: never caught, or long ago)."""
        peer = self.peers.get(key)
        if peer is None or not peer.caught:
            return 0.0
        now = time.time() if now is None else now
        return max(0.0, peer.caught + self.policy.caught_for - now)

    def mark_caught(self, key: bytes) -> None:
        """The peer served a corrupt copy of a shard it holds for us: its trust drops to
        the floor (its referrer loses its share) and its caught period starts. Written at
        once: a restart must not forgive it."""
        peer = self.peers.get(key)
        if peer is None:
            return
        before = peer.trust
        peer.trust = self.policy.floor
        peer.fail += 1
        peer.caught = time.time()
        referrer = self.peers.get(peer.referrer) if peer.referrer else None
        if referrer is not None and referrer is not peer:
            share = self.policy.referral_share * (peer.trust - before)
            referrer.trust = self.policy.clamp(referrer.trust + share)
            self._dirty.add(referrer.key)
        self._dirty.discard(key)
        with self.db.write() as txn:  # one small row, rare
            txn.put(key, peer.encode(), db=self._peers_db)

    def weight(self, key: bytes) -> float:
        """Placement weight of the peer (trust, damped while vetting)."""
        peer = self.peers.get(key)
        return 0.0 if peer is None else self.policy.weight(peer.trust, peer.ok)

    def forget(self, key: bytes) -> None:
        """Drop a peer's row (its index stays reserved for it, never reused)."""
        if self.peers.pop(key, None) is not None:
            self._dirty.discard(key)
            self._deleted.add(key)

    # --- persistence ---------------------------------------------------------------------

    def save(self, peer: Peer) -> None:
        """Mark a peer's record for the next flush."""
        self._dirty.add(peer.key)

    def _pending(self, everything: bool) -> tuple[list[tuple[bytes, bytes]], list[bytes], dict]:
        keys = self.peers.keys() if everything else self._dirty
        rows = [(k, self.peers[k].encode()) for k in keys if k in self.peers]
        deleted, index = list(self._deleted), dict(self._unwritten_index)
        self._dirty, self._deleted, self._unwritten_index = set(), set(), {}
        return rows, deleted, index

    def _write(self, rows: list, deleted: list, index: dict) -> None:
        with self.db.write() as txn:
            for number, key in index.items():
                txn.put(_U32.pack(number), key, db=self._index_db)
            for key in deleted:
                txn.delete(key, db=self._peers_db)
            for key, raw in rows:
                txn.put(key, raw, db=self._peers_db)

    async def flush(self) -> None:
        """Write changed rows and deletions in a worker thread (periodically, and after a
        handshake verified an address). One flush at a time, so writes land in order."""
        async with self._flush_lock:
            rows, deleted, index = self._pending(everything=False)
            if not (rows or deleted or index):
                return
            await trio.to_thread.run_sync(self._write, rows, deleted, index)
            # A row deleted and learned again while the thread ran: write it once more.
            self._dirty.update(k for k in deleted if k in self.peers)

    def save_all(self) -> None:
        """Persist every record now (at exit)."""
        self._write(*self._pending(everything=True))
