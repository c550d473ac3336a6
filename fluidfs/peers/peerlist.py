"""The peer list: every peer we know, where to reach it, and how it has behaved.

Stored in ``meta.lmdb`` (format version 1):

- table ``peers``: key ``public key(32)`` → CBOR map
  ``{"v": 1, "index": int, "addr": str, "first_seen": float, "last_seen": float,
  "referrer": bytes | None, "trust": float, "ok": int, "fail": int}``
- table ``peer_index``: ``u32 index`` → public key. Index 0 is this node; block
  records name shard holders by these small indexes instead of 32-byte keys.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import cbor2

from fluidfs.peers.trust import DEFAULT_POLICY, TrustPolicy
from fluidfs.store.db import Database

VERSION = 1
SELF_INDEX = 0
_U32 = struct.Struct(">I")


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

    def encode(self) -> bytes:
        """CBOR, version 1."""
        body = asdict(self)
        del body["key"]
        return cbor2.dumps({"v": VERSION, **body})

    @classmethod
    def decode(cls, key: bytes, raw: bytes) -> Peer:
        """Parse what encode() wrote."""
        body = cbor2.loads(raw)
        if body.pop("v", None) != VERSION:
            raise ValueError("unknown peer record version")
        return cls(key=bytes(key), **body)


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
        with db.read() as txn:
            for key, raw in txn.cursor(db=self._peers_db):
                peer = Peer.decode(key, raw)
                self.peers[peer.key] = peer
                self.by_index[peer.index] = peer.key

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

    def add(self, key: bytes, addr: str = "", referrer: bytes | None = None) -> Peer:
        """Learn a peer (or refresh its address); return its record."""
        if key == self.self_key:
            raise ValueError("that is this node's own identity")
        peer = self.peers.get(key)
        now = time.time()
        if peer is None:
            index = max(self.by_index) + 1
            peer = Peer(
                key, index, addr, first_seen=now, referrer=referrer, trust=self.policy.initial
            )
            self.peers[key] = peer
            self.by_index[index] = key
            with self.db.write() as txn:
                txn.put(_U32.pack(index), key, db=self._index_db)
                txn.put(key, peer.encode(), db=self._peers_db)
        elif addr and addr != peer.addr:
            peer.addr = addr
            self.save(peer)
        return peer

    def seen(self, key: bytes, addr: str = "") -> None:
        """Note that the peer answered us just now."""
        peer = self.peers.get(key)
        if peer is not None:
            peer.last_seen = time.time()
            if addr:
                peer.addr = addr

    def record(self, key: bytes, ok: bool) -> None:
        """Count one success or failure of the peer; pass a share to its referrer."""
        peer = self.peers.get(key)
        if peer is None:
            return
        before = peer.trust
        peer.trust = self.policy.after(peer.trust, ok)
        if ok:
            peer.ok += 1
            peer.last_seen = time.time()
        else:
            peer.fail += 1
        referrer = self.peers.get(peer.referrer) if peer.referrer else None
        if referrer is not None and referrer is not peer:
            share = self.policy.referral_share * (peer.trust - before)
            referrer.trust = self.policy.clamp(referrer.trust + share)

    def weight(self, key: bytes) -> float:
        """Placement weight of the peer (trust, damped while vetting)."""
        peer = self.peers.get(key)
        return 0.0 if peer is None else self.policy.weight(peer.trust, peer.ok)

    def forget(self, key: bytes) -> None:
        """Drop a peer we have not seen for a long time (its index is never reused)."""
        if self.peers.pop(key, None) is not None:
            with self.db.write() as txn:
                txn.delete(key, db=self._peers_db)

    def save(self, peer: Peer) -> None:
        """Persist a peer's record."""
        with self.db.write() as txn:
            txn.put(peer.key, peer.encode(), db=self._peers_db)

    def save_all(self) -> None:
        """Persist every record (periodically, for last-seen times and counters)."""
        with self.db.write() as txn:
            for peer in self.peers.values():
                txn.put(peer.key, peer.encode(), db=self._peers_db)
