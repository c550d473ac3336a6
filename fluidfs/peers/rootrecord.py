"""Small signed records an owner keeps on its peers: the root pointer and the writer lease.

Format version 1. What a peer stores (and checks) is the *envelope*, a CBOR map::

    {"v": 1, "kind": "root" | "lease", "owner": public key (32), "seq": uint < 2^63,
     "box": nonce (24) || XChaCha20-Poly1305(body, aad=header, key=metadata key),
     "sig": Ed25519 signature (64) by the owner's identity key over
            "fluidfs-record-v1\\0" || header || box}

    header = CBOR [1, kind, owner, seq]

A peer can check who wrote a record and compare sequence numbers, but learns
nothing else: the body is encrypted with the owner's metadata key, which never
leaves the keyfile. The body is a CBOR map that repeats ``kind`` and ``seq`` (so a
box cannot be moved under another header even by someone holding the key), and
carries, for ``root``: ``time`` (ns), ``machine`` (16 bytes), ``host``, ``commit``
(bytes: the commit node's reference as a one-entry metadata leaf, see
fs/metaformat.py) and ``peers`` (``[[public key, "host:port"], ...]``: where the
holders can be reached); for ``lease``: ``time``, ``machine``, ``host``, ``mount``,
``pid``, ``addr``, ``ttl`` (seconds) and ``state`` (``"held"`` or ``"released"``).

Peers keep, per owner and kind, the valid envelope with the highest ``seq`` and
refuse lower ones (service.py, ``PutRecord``/``GetRecord``). ``seq`` stays below 2^63 so
that counting on from any accepted record never overflows a u64. The ``seq`` a peer
reports in a ``PutRecord`` reply is a claim, never used: an owner believes only seqs of
records that verify under its own key (``newest()``, and ``publish()`` fetching the
record a peer says is newer). An owner looking for its
newest record asks every peer it can reach and believes only what verifies and
decrypts: a peer that serves an old record loses to any newer one, and a forged
one is ignored.

Envelopes and bodies are checked by the schemas ``RECORD`` and ``BODY_HEAD``
(fluidfs.wire): the envelope exactly (it comes from anyone), the body's ``kind`` and
``seq`` (the rest is the kind's own: see lease.py's ``LEASE_BODY``; unknown keys are
kept, for later versions).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import cbor2
import nacl.exceptions
import nacl.signing
import trio
from nacl import bindings as sodium

from fluidfs.keys import KeyRing, encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.address import PeerAddr
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.peerlist import PeerList
from fluidfs.wire import IGNORE, Bytes, Int, Map, OneOf, SchemaError, Str, Tuple, cbor

log = logging.getLogger(__name__)

VERSION = 1
KINDS = ("root", "lease")
MAX_RECORD = 64 * 1024
SIG_CONTEXT = b"fluidfs-record-v1\x00"
NONCE_SIZE = 24
CALL_TIMEOUT = 10.0
MAX_PEERS_LISTED = 256
MAX_SEQ = 2**63  # exclusive
MAX_ADDR = 300  # "host:port"
RECORD_ITEMS = 16  # data items of an envelope (it has 13)


class RecordError(ValueError):
    """A record that is malformed, not ours, forged or undecryptable."""


@dataclass(frozen=True)
class Envelope:
    """The part of a record every peer can check."""

    kind: str
    owner: bytes
    seq: int
    box: bytes
    sig: bytes
    raw: bytes

    def header(self) -> bytes:
        return _header(self.kind, self.owner, self.seq)

    def signed_ok(self) -> bool:
        """True if the signature is the owner's."""
        try:
            key = nacl.signing.VerifyKey(self.owner)
            key.verify(SIG_CONTEXT + self.header() + self.box, self.sig)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True


def _header(kind: str, owner: bytes, seq: int) -> bytes:
    return cbor2.dumps([VERSION, kind, owner, seq])


#: What a peer stores: exactly these keys.
RECORD = Map(
    {
        "v": OneOf(VERSION),
        "kind": OneOf(*KINDS),
        "owner": Bytes(32, 32),
        "seq": Int(0, MAX_SEQ - 1),
        "box": Bytes(NONCE_SIZE + 16, MAX_RECORD),
        "sig": Bytes(64, 64),
    }
)
#: The part of a decrypted body every kind shares.
BODY_HEAD = Map({"kind": OneOf(*KINDS), "seq": Int(0, MAX_SEQ - 1)}, extra=IGNORE)
#: One item of a root record's ``peers`` list.
LISTED_PEER = Tuple(Bytes(32, 32), Str(MAX_ADDR))


def parse(raw: bytes) -> Envelope:
    """Parse an envelope (bounded, strict); raise RecordError. Does not check the signature."""
    try:
        f = cbor.decode(RECORD, raw, max_size=MAX_RECORD, max_items=RECORD_ITEMS)
    except SchemaError as exc:
        raise RecordError(f"malformed record: {exc}") from None
    return Envelope(f["kind"], f["owner"], f["seq"], f["box"], f["sig"], raw)


def seal(keyring: KeyRing, kind: str, seq: int, body: dict[str, Any]) -> bytes:
    """Make a signed, encrypted record."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    if not 0 <= seq < MAX_SEQ:
        raise ValueError(f"record seq {seq} out of range")
    header = _header(kind, keyring.public_key, seq)
    plain = cbor2.dumps({**body, "kind": kind, "seq": seq})
    nonce = os.urandom(NONCE_SIZE)
    box = nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plain, header, nonce, keyring.metadata_key
    )
    sig = keyring.signing_key.sign(SIG_CONTEXT + header + box).signature
    raw = cbor2.dumps(
        {
            "v": VERSION,
            "kind": kind,
            "owner": keyring.public_key,
            "seq": seq,
            "box": box,
            "sig": sig,
        }
    )
    if len(raw) > MAX_RECORD:
        raise ValueError(f"record of {len(raw)} bytes exceeds {MAX_RECORD}")
    return raw


def open_record(keyring: KeyRing, raw: bytes, kind: str) -> tuple[int, dict[str, Any]]:
    """Check and decrypt one of our own records; return (seq, body). Raises RecordError."""
    env = parse(raw)
    if env.kind != kind:
        raise RecordError(f"expected a {kind} record, got {env.kind}")
    if env.owner != keyring.public_key:
        raise RecordError("record of another owner")
    if not env.signed_ok():
        raise RecordError("bad signature")
    nonce, sealed = env.box[:NONCE_SIZE], env.box[NONCE_SIZE:]
    try:
        plain = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed, env.header(), nonce, keyring.metadata_key
        )
        body = cbor.loads(plain)
    except Exception:
        raise RecordError("record does not decrypt") from None
    try:
        head = BODY_HEAD.parse(body)
    except SchemaError as exc:
        raise RecordError(f"malformed record body: {exc}") from None
    if head["kind"] != kind or head["seq"] != env.seq:
        raise RecordError("record body does not match its header")
    return env.seq, body


@dataclass
class Found:
    """The newest valid record of a kind among the peers that answered."""

    seq: int
    body: dict[str, Any]
    raw: bytes
    answered: int  # peers that replied (with a record or not_found)
    holding: int  # peers that hold this exact seq
    absent: int = 0  # peers that said not_found (none of this kind for us)

    @property
    def exists(self) -> bool:
        """False when peers answered but none holds a record of this kind."""
        return bool(self.raw)


class RecordClient:
    """Publishes our records to peers and finds the newest one."""

    def __init__(self, keyring: KeyRing, conns: Connections, peers: PeerList) -> None:
        self.keyring = keyring
        self.conns = conns
        self.peers = peers
        self.rejected = 0  # records seen that did not verify (forged or corrupt)
        # Highest seq per kind among records that verified under our key, from peers that
        # refused a publish as older than what they hold (never a number a peer reported).
        self.highest: dict[str, int] = {}

    def _targets(self) -> list[bytes]:
        keys = {p.key for p in self.peers if p.addr}
        keys |= {k for k, c in self.conns.conns.items() if not c.closed}
        keys.discard(self.keyring.public_key)
        return sorted(keys)

    async def publish(self, kind: str, seq: int, body: dict[str, Any]) -> int:
        """Store the record on every reachable peer; return how many accepted it.

        When a peer refuses it as older than what it holds, the record it holds is
        fetched and verified: ``self.highest[kind]`` is raised to its seq only if it is
        ours. The seq in the reply itself is not believed.
        """
        raw = seal(self.keyring, kind, seq, body)
        stored = 0

        async def one(key: bytes) -> None:
            nonlocal stored
            try:
                reply = await self.conns.call(
                    key, "PutRecord", {"record": raw}, timeout=CALL_TIMEOUT
                )
            except (PeerUnavailable, RpcError) as exc:
                log.debug("storing our %s record on %s failed: %s", kind, _short(key), exc)
                return
            if reply["stored"]:
                stored += 1
                return
            held = await self._verified_seq(key, kind)
            if held is None:
                return
            self.highest[kind] = max(self.highest.get(kind, 0), held)
            if held > seq:
                log.info(
                    "peer %s keeps a newer %s record (seq %d > %d)", _short(key), kind, held, seq
                )

        async with trio.open_nursery() as nursery:
            for key in self._targets():
                nursery.start_soon(one, key)
        return stored

    async def _verified_seq(self, key: bytes, kind: str) -> int | None:
        """The seq of the record *key* holds for us, if it verifies under our key."""
        try:
            reply = await self.conns.call(key, "GetRecord", {"kind": kind}, timeout=CALL_TIMEOUT)
        except (PeerUnavailable, RpcError) as exc:
            log.info("peer %s refused our %s record but does not show it: %s",
                     _short(key), kind, exc)
            return None
        opened = self._open_from(key, reply["record"], kind)
        return None if opened is None else opened[0]

    def _open_from(self, key: bytes, raw: bytes, kind: str) -> tuple[int, dict[str, Any]] | None:
        """(seq, body) of a record peer *key* served, if it verifies; a bad one costs trust."""
        try:
            return open_record(self.keyring, raw, kind)
        except RecordError as exc:
            self.rejected += 1
            log.warning("peer %s served a bad %s record: %s", _short(key), kind, exc)
            self.peers.record(key, False)
            return None

    async def newest(self, kind: str, *, follow_peers: bool = False) -> Found | None:
        """The newest record of *kind* that verifies, from every peer we can reach.

        With *follow_peers*, peers listed in the records found are learned and asked
        too (a fresh machine knows only the keyfile's few addresses).
        """
        asked: set[bytes] = set()
        best: Found | None = None
        answered = absent = 0
        copies: dict[int, int] = {}
        while True:
            targets = [k for k in self._targets() if k not in asked]
            if not targets:
                break
            asked.update(targets)
            results: list[tuple[int, dict, bytes]] = []

            async def one(key: bytes, results: list = results) -> None:
                nonlocal answered, absent
                try:
                    reply = await self.conns.call(
                        key, "GetRecord", {"kind": kind}, timeout=CALL_TIMEOUT
                    )
                except RpcError as exc:
                    if exc.code == "not_found":
                        answered += 1
                        absent += 1
                    return
                except PeerUnavailable:
                    return
                answered += 1
                opened = self._open_from(key, reply["record"], kind)
                if opened is not None:
                    results.append((*opened, reply["record"]))

            async with trio.open_nursery() as nursery:
                for key in targets:
                    nursery.start_soon(one, key)
            for seq, body, raw in results:
                copies[seq] = copies.get(seq, 0) + 1
                if best is None or seq > best.seq:
                    best = Found(seq, body, raw, 0, 0)
                if follow_peers:
                    self.learn(body.get("peers", []))
        if best is not None:
            best.answered, best.holding = answered, copies.get(best.seq, 0)
            best.absent = absent
        elif answered:
            return Found(0, {}, b"", answered, 0, absent)
        return best

    def learn(self, listed: object) -> int:
        """Add the peers a record lists (key, address); return how many were new."""
        if type(listed) is not list:
            return 0
        new = 0
        for item in listed[:MAX_PEERS_LISTED]:
            try:  # the list is ours (signed), but a bad item costs only itself
                key, addr = LISTED_PEER.parse(item)
            except SchemaError:
                continue
            if key == self.keyring.public_key:
                continue
            try:
                PeerAddr.parse(addr)
            except ValueError:
                continue
            if key not in self.peers:
                new += 1
            if key not in self.peers or not self.peers.get(key).addr:
                self.peers.add(key, addr)
        return new

    def listing(self) -> list[list]:
        """Peers to name in our root record: those we have addresses for, best first."""
        known = sorted(
            (p for p in self.peers if p.addr),
            key=lambda p: (-p.trust, -p.last_seen),
        )
        return [[p.key, p.addr] for p in known[:MAX_PEERS_LISTED]]


def _short(key: bytes) -> str:
    return encode_peer_id(key)[:12]
