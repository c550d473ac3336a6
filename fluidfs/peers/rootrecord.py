"""Small signed records an owner keeps on its peers: the root pointer and the writer lease.

Format version 2. What a peer stores (and checks) is the *envelope*, a CBOR map::

    {"v": 2, "kind": "root" | "lease", "owner": public key (32), "seq": uint < 2^63,
     "fence": uint < 2^63,
     "box": nonce (24) || XChaCha20-Poly1305(body, aad=header, key=metadata key),
     "sig": Ed25519 signature (64) by the owner's identity key over
            "fluidfs-record-v2\\0" || header || box}

    header = CBOR [2, kind, owner, seq, fence]

``fence`` is the fencing number of the writer lease the record was written under (see
lease.py): it grows by one at each change of writer, and a peer refuses a record whose
fence is below the highest it holds for that owner, so a writer that was replaced can
no longer change anything. Version 1 (no ``fence``, header ``[1, kind, owner, seq]``,
context ``"fluidfs-record-v1\\0"``) is still read, as fence 0; it is never written.

A peer can check who wrote a record and compare sequence numbers, but learns
nothing else: the body is encrypted with the owner's metadata key, which never
leaves the keyfile. The body is a CBOR map that repeats ``kind`` and ``seq`` (so a
box cannot be moved under another header even by someone holding the key), and
carries, for ``root``: ``time`` (ns), ``machine`` (16 bytes), ``host``, ``commit``
(bytes: the commit node's reference as a one-entry metadata leaf, see
fs/metaformat.py), ``peers`` (``[[public key, "host:port"], ...]``: where the
holders can be reached) and ``held_at`` (``[[peer key, provider key, "host:port"],
...]``: the storage provider holding a listed peer's side of our agreement, so a fresh
machine asks it while the peer is away; peers/sides.py); for ``lease``: ``time``,
``machine``, ``host``, ``mount``, ``pid``, ``addr``, ``ttl`` (seconds) and ``state``
(``"held"`` or ``"released"``).

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
from fluidfs.peers.sides import ProviderSides
from fluidfs.wire import IGNORE, Bytes, Int, Map, OneOf, SchemaError, Str, Tuple, cbor

log = logging.getLogger(__name__)

VERSION = 2
VERSIONS = (1, 2)
KINDS = ("root", "lease")
MAX_RECORD = 64 * 1024
SIG_CONTEXTS = {1: b"fluidfs-record-v1\x00", 2: b"fluidfs-record-v2\x00"}
NONCE_SIZE = 24
CALL_TIMEOUT = 10.0
MAX_PEERS_LISTED = 256
MAX_SEQ = 2**63  # exclusive
MAX_ADDR = 300  # "host:port"
RECORD_ITEMS = 18  # data items of an envelope (it has 15)


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
    fence: int = 0
    version: int = VERSION

    def header(self) -> bytes:
        return _header(self.kind, self.owner, self.seq, self.fence, self.version)

    def signed_ok(self) -> bool:
        """True if the signature is the owner's."""
        try:
            key = nacl.signing.VerifyKey(self.owner)
            key.verify(SIG_CONTEXTS[self.version] + self.header() + self.box, self.sig)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True


def _header(kind: str, owner: bytes, seq: int, fence: int, version: int = VERSION) -> bytes:
    if version == 1:
        return cbor2.dumps([1, kind, owner, seq])
    return cbor2.dumps([version, kind, owner, seq, fence])


#: What a peer stores: exactly these keys (``fence`` in version 2 only).
RECORD = Map(
    {
        "v": OneOf(*VERSIONS),
        "kind": OneOf(*KINDS),
        "owner": Bytes(32, 32),
        "seq": Int(0, MAX_SEQ - 1),
        "box": Bytes(NONCE_SIZE + 16, MAX_RECORD),
        "sig": Bytes(64, 64),
    },
    optional={"fence": Int(0, MAX_SEQ - 1)},
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
    if (f["v"] == 1) != ("fence" not in f):
        raise RecordError("malformed record: a fence belongs in version 2, and only there")
    return Envelope(
        f["kind"], f["owner"], f["seq"], f["box"], f["sig"], raw, f.get("fence", 0), f["v"]
    )


def seal(keyring: KeyRing, kind: str, seq: int, body: dict[str, Any], fence: int = 0) -> bytes:
    """Make a signed, encrypted record written under lease fence *fence*."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    if not 0 <= seq < MAX_SEQ:
        raise ValueError(f"record seq {seq} out of range")
    if not 0 <= fence < MAX_SEQ:
        raise ValueError(f"record fence {fence} out of range")
    header = _header(kind, keyring.public_key, seq, fence)
    plain = cbor2.dumps({**body, "kind": kind, "seq": seq})
    nonce = os.urandom(NONCE_SIZE)
    box = nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plain, header, nonce, keyring.metadata_key
    )
    sig = keyring.signing_key.sign(SIG_CONTEXTS[VERSION] + header + box).signature
    raw = cbor2.dumps(
        {
            "v": VERSION,
            "kind": kind,
            "owner": keyring.public_key,
            "seq": seq,
            "fence": fence,
            "box": box,
            "sig": sig,
        }
    )
    if len(raw) > MAX_RECORD:
        raise ValueError(f"record of {len(raw)} bytes exceeds {MAX_RECORD}")
    return raw


def open_record(keyring: KeyRing, raw: bytes, kind: str) -> tuple[int, dict[str, Any]]:
    """Check and decrypt one of our own records; return (seq, body). Raises RecordError."""
    env, body = open_envelope(keyring, raw, kind)
    return env.seq, body


def open_envelope(keyring: KeyRing, raw: bytes, kind: str) -> tuple[Envelope, dict[str, Any]]:
    """Check and decrypt one of our own records; return (envelope, body). Raises RecordError."""
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
    return env, body


@dataclass
class Found:
    """The newest valid record of a kind among the peers that answered."""

    seq: int
    body: dict[str, Any]
    raw: bytes
    answered: int  # peers that replied (with a record or not_found)
    holding: int  # peers that hold this exact seq
    absent: int = 0  # peers that said not_found (none of this kind for us)
    fence: int = 0  # the fence it was written under


    @property
    def exists(self) -> bool:
        """False when peers answered but none holds a record of this kind."""
        return bool(self.raw)


@dataclass(frozen=True)
class Held:
    """A record of ours a peer holds, read back and verified under our key."""

    seq: int
    fence: int
    body: dict[str, Any]


@dataclass(frozen=True)
class PutResult:
    """How one peer answered one ``PutRecord``."""

    stored: bool
    held: Held | None = None  # when refused: what it holds instead (None: nothing readable)


class RecordClient:
    """Publishes our records to peers and finds the newest one."""

    def __init__(self, keyring: KeyRing, conns: Connections, peers: PeerList,
                 *, sides: ProviderSides | None = None) -> None:
        self.keyring = keyring
        self.conns = conns
        self.peers = peers
        self.sides = sides  # where partners' sides are held (None: not listed, not learned)
        self.rejected = 0  # records seen that did not verify (forged or corrupt)
        # Highest seq per kind among records that verified under our key, from peers that
        # refused a publish as older than what they hold (never a number a peer reported).
        self.highest: dict[str, int] = {}
        # Highest fence among our records that peers refused ours for (verified, as above):
        # a writer whose fence is below it has been replaced.
        self.fence_seen = 0

    def _targets(self) -> list[bytes]:
        keys = {p.key for p in self.peers if p.addr}
        keys |= {k for k, c in self.conns.conns.items() if not c.closed}
        keys.discard(self.keyring.public_key)
        return sorted(keys)

    async def publish(self, kind: str, seq: int, body: dict[str, Any], *, fence: int = 0) -> int:
        """Store the record on every reachable peer; return how many accepted it.

        When a peer refuses it as older than what it holds, the record it holds is
        fetched and verified: ``self.highest[kind]`` is raised to its seq (and
        ``fence_seen`` to its fence) only if it is ours. The seq in the reply itself is
        not believed.
        """
        raw = seal(self.keyring, kind, seq, body, fence)
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
            held = await self._verified(key, kind)
            if kind != "lease" and (held is None or held.seq < seq):
                # Refused for its fence: the lease there shows the later writer's.
                await self._verified(key, "lease")
            if held is None:
                return
            if held.fence > fence:
                log.info("peer %s holds a %s record of a later writer (fence %d > %d)",
                         _short(key), kind, held.fence, fence)
            if held.seq > seq:
                log.info("peer %s keeps a newer %s record (seq %d > %d)",
                         _short(key), kind, held.seq, seq)

        async with trio.open_nursery() as nursery:
            for key in self._targets():
                nursery.start_soon(one, key)
        return stored

    async def put_each(
        self,
        kind: str,
        raw: bytes,
        keys: list[bytes],
        expect: dict[bytes, int] | None = None,
        *,
        timeout: float = CALL_TIMEOUT,
    ) -> dict[bytes, PutResult]:
        """``PutRecord`` of *raw* to each of *keys* (with ``expect[key]`` as its
        compare-and-swap condition, if given); the peers that answered, with how.

        A refusal is followed by reading back what the peer holds (verified under our key:
        neither its reply's seq nor its word is believed).
        """
        results: dict[bytes, PutResult] = {}

        async def one(key: bytes) -> None:
            args: dict[str, Any] = {"record": raw}
            if expect is not None:
                args["expect"] = expect.get(key, 0)
            try:
                reply = await self.conns.call(key, "PutRecord", args, timeout=timeout)
            except (PeerUnavailable, RpcError) as exc:
                log.debug("storing our %s record on %s failed: %s", kind, _short(key), exc)
                return
            if reply["stored"]:
                results[key] = PutResult(True)
                return
            held = await self._verified(key, kind)
            if held is not None:
                self._note(kind, held)
            results[key] = PutResult(False, held)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
        return results

    async def read_each(
        self, kind: str, keys: list[bytes], *, timeout: float = CALL_TIMEOUT
    ) -> dict[bytes, Held | None]:
        """What each of *keys* holds of ours (None: nothing, or nothing that verifies);
        peers that did not answer are left out."""
        found: dict[bytes, Held | None] = {}

        async def one(key: bytes) -> None:
            try:
                reply = await self.conns.call(key, "GetRecord", {"kind": kind}, timeout=timeout)
            except RpcError as exc:
                if exc.code == "not_found":
                    found[key] = None
                return
            except PeerUnavailable:
                return
            found[key] = self._open_from(key, reply["record"], kind)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
        return found

    def targets(self) -> list[bytes]:
        """The peers we would ask now."""
        return self._targets()

    def _note(self, kind: str, held: Held) -> None:
        self.highest[kind] = max(self.highest.get(kind, 0), held.seq)
        self.fence_seen = max(self.fence_seen, held.fence)

    async def _verified(self, key: bytes, kind: str) -> Held | None:
        """The record *key* holds for us, if it verifies under our key."""
        try:
            reply = await self.conns.call(key, "GetRecord", {"kind": kind}, timeout=CALL_TIMEOUT)
        except (PeerUnavailable, RpcError) as exc:
            log.info("peer %s refused our %s record but does not show it: %s",
                     _short(key), kind, exc)
            return None
        held = self._open_from(key, reply["record"], kind)
        if held is not None:
            self._note(kind, held)
        return held

    def _open_from(self, key: bytes, raw: bytes, kind: str) -> Held | None:
        """A record peer *key* served, if it verifies; a bad one costs trust."""
        try:
            env, body = open_envelope(self.keyring, raw, kind)
        except RecordError as exc:
            self.rejected += 1
            log.warning("peer %s served a bad %s record: %s", _short(key), kind, exc)
            self.peers.record(key, False)
            return None
        return Held(env.seq, env.fence, body)

    async def newest(self, kind: str, *, follow_peers: bool = False) -> Found | None:
        """The newest record of *kind* that verifies, from every peer we can reach: the
        highest fence, then the highest seq.

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
            results: list[tuple[Held, bytes]] = []

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
                    results.append((opened, reply["record"]))

            async with trio.open_nursery() as nursery:
                for key in targets:
                    nursery.start_soon(one, key)
            for held, raw in results:
                copies[held.seq] = copies.get(held.seq, 0) + 1
                # A later writer's record wins over any of an earlier one (its fence),
                # whatever seq a replaced writer went on to publish where it could.
                if best is None or (held.fence, held.seq) > (best.fence, best.seq):
                    best = Found(held.seq, held.body, raw, 0, 0, fence=held.fence)
                if follow_peers:
                    self.learn_root(held.body)
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

    def learn_root(self, body: dict[str, Any]) -> int:
        """Learn from one of our root records' bodies the peers it lists and the
        providers holding their sides; return how many peers were new."""
        if self.sides is not None:
            self.sides.learn(body.get("held_at", []), self.keyring.public_key)
        return self.learn(body.get("peers", []))

    def root_listing(self) -> dict[str, list]:
        """The ``peers`` and ``held_at`` entries of our root record's body."""
        listing: dict[str, list] = {"peers": self.listing()}
        if self.sides is not None:
            listing["held_at"] = self.sides.listing()
        return listing

    def listing(self) -> list[list]:
        """Peers to name in our root record: those we have addresses for, best first."""
        known = sorted(
            (p for p in self.peers if p.addr),
            key=lambda p: (-p.trust, -p.last_seen),
        )
        return [[p.key, p.addr] for p in known[:MAX_PEERS_LISTED]]


def _short(key: bytes) -> str:
    return encode_peer_id(key)[:12]
