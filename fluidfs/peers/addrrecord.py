"""Address records: where a node says it can be reached, signed by its identity.

Format version 1, a CBOR map (at most ``MAX_RECORD`` bytes)::

    {"v": 1, "id": public key (32), "time": Unix milliseconds (u63),
     "addrs": ["host:port", ...] (1 to MAX_ADDRS, each a dialable PeerAddr),
     "sig": Ed25519 signature (64) by ``id`` over
            "fluidfs-address-v1\\0" || CBOR [1, id, time, addrs]}

Version 2 adds the relays the node can be reached through (peers/relay.py)::

    {"v": 2, "id", "time",
     "addrs": [...] (0 to MAX_ADDRS: a node nobody can dial has none),
     "via": ["host:port", ...] (1 to MAX_VIA relays, best first;
            addrs and via together at most MAX_ADDRS, so a record stays within MAX_RECORD),
     "sig": by ``id`` over "fluidfs-address-v2\\0" || CBOR [2, id, time, addrs, via]}

A node signs version 2 only when it has relays to name, so peers from before relays keep
reading the records of every node that needs none.

Version 3 is signed by a node that relays for others (``serve --relay``) and says so,
so that nodes nobody can dial find it among the records discovery passes around
(peers/relayclient.py)::

    {"v": 3, "id", "time",
     "addrs": [...] (1 to MAX_ADDRS: a relay must be dialable),
     "via": [...] (optional, as in version 2),
     "relay": true,
     "sig": by ``id`` over "fluidfs-address-v3\\0" || CBOR [3, id, time, addrs, via or [],
            true]} A dialler tries ``addrs`` first, then
each relay in ``via`` (peers/connections.py).

``addrs`` is in order of preference (a port mapping the gateway granted, then the
address peers see us at, then the one we listen on). A record is believed only as the
identity it names: nobody else can plant an address for a peer or redirect it, whoever
passes the record on (``Ping`` from the node itself, ``ShareNewPeers`` answers from
anyone). Of two valid records for one id the one with the later ``time`` wins; a record
more than ``MAX_SKEW`` in the future is refused (so one cannot be made to win forever),
and ``AddressBook`` keeps at most ``MAX_KEPT`` records, in memory: after a restart the
first valid record heard for a peer starts its history again (a replayed old record can
then only name an address that peer itself once announced, and dialling it proves the
identity before anything is sent).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import cbor2
import nacl.exceptions
import nacl.signing

from fluidfs.net.messages import MAX_ADDR_RECORD
from fluidfs.peers.address import AddressError, PeerAddr
from fluidfs.peers.peerlist import PeerList
from fluidfs.wire import Bool, Bytes, Int, List, Map, SchemaError, Str, cbor

VERSION = 1
VERSION_VIA = 2
VERSION_RELAY = 3
MAX_ADDRS = 3
MAX_VIA = 2
MAX_ADDR_TEXT = 128
MAX_RECORD = MAX_ADDR_RECORD  # 640: three addresses of 128 characters fit
MAX_SKEW_MS = 10 * 60 * 1000  # a record may be this far ahead of our clock
MAX_KEPT = 4096
SIG_CONTEXT = b"fluidfs-address-v1\x00"
SIG_CONTEXT_VIA = b"fluidfs-address-v2\x00"
SIG_CONTEXT_RELAY = b"fluidfs-address-v3\x00"

ADDR_TEXTS = List(Str(min=1, max=MAX_ADDR_TEXT), max_len=MAX_ADDRS)
RECORD = Map({  # both versions; read_record checks what each requires
    "v": Int(VERSION, VERSION_RELAY),
    "id": Bytes(min=32, max=32),
    "time": Int(0, 2**63 - 1),
    "addrs": ADDR_TEXTS,
    "sig": Bytes(min=64, max=64),
}, optional={"via": List(Str(min=1, max=MAX_ADDR_TEXT), min_len=1, max_len=MAX_VIA),
             "relay": Bool()})


class RecordError(ValueError):
    """Bytes that are not a valid address record (for the identity expected)."""


@dataclass(frozen=True)
class AddressRecord:
    """A verified record: *key* says it is reachable at *addrs* as of *time* (ms)."""

    key: bytes
    time: int
    addrs: tuple[PeerAddr, ...]
    raw: bytes  # the signed encoding, passed on as it came
    via: tuple[PeerAddr, ...] = ()  # relays it can be reached through (version 2)
    relay: bool = False  # it relays for nodes nobody can dial (version 3)


def _signed_part(key: bytes, when: int, addrs: list[str],
                 via: list[str] | None = None, relay: bool = False) -> bytes:
    if relay:
        return SIG_CONTEXT_RELAY + cbor2.dumps([VERSION_RELAY, key, when, addrs, via or [],
                                                True])
    if via is None:
        return SIG_CONTEXT + cbor2.dumps([VERSION, key, when, addrs])
    return SIG_CONTEXT_VIA + cbor2.dumps([VERSION_VIA, key, when, addrs, via])


def make_record(identity: nacl.signing.SigningKey, addrs: list[PeerAddr],
                when_ms: int | None = None, via: list[PeerAddr] = (),
                relay: bool = False) -> AddressRecord:
    """Sign a record that this node is reachable at *addrs* (best first), or through
    the relays *via* (version 2, only when there are any); with *relay*, that it relays
    for others (version 3: it needs an address)."""
    if not 1 <= len(addrs) + len(via) <= MAX_ADDRS or len(via) > MAX_VIA:
        raise ValueError(f"a record names 1 to {MAX_ADDRS} addresses and relays, at most "
                         f"{MAX_VIA} relays")
    if relay and not addrs:
        raise ValueError("a relay's record names an address it can be dialled at")
    if any(len(str(a)) > MAX_ADDR_TEXT for a in [*addrs, *via]):
        raise ValueError(f"an address in a record has at most {MAX_ADDR_TEXT} characters")
    key = bytes(identity.verify_key)
    when = int(time.time() * 1000) if when_ms is None else when_ms
    texts = [str(a) for a in addrs]
    relays = [str(a) for a in via] or None
    sig = identity.sign(_signed_part(key, when, texts, relays, relay)).signature
    version = VERSION_RELAY if relay else VERSION if relays is None else VERSION_VIA
    body: dict = {"v": version, "id": key, "time": when, "addrs": texts, "sig": sig}
    if relays is not None:
        body["via"] = relays
    if relay:
        body["relay"] = True
    return AddressRecord(key, when, tuple(addrs), cbor2.dumps(body), tuple(via), relay)


def read_record(raw: bytes, expected: bytes | None = None,
                now_ms: int | None = None) -> AddressRecord:
    """Check bytes from anyone: the schema, the signature by the id it names (which must
    be *expected* if given), the clock; addresses that are not dialable are dropped (a
    record left with none is refused). Raises ``RecordError``."""
    if type(raw) is not bytes or len(raw) > MAX_RECORD:
        raise RecordError(f"an address record has at most {MAX_RECORD} bytes")
    try:
        body = cbor.decode(RECORD, raw, max_size=MAX_RECORD, max_items=32)
    except SchemaError as exc:
        raise RecordError(f"address record: {exc}") from None
    key = body["id"]
    relays = body.get("via")
    if body["v"] == VERSION and (relays is not None or not body["addrs"]):
        raise RecordError("a version 1 record names 1 to 3 addresses and no relays")
    if body["v"] == VERSION_VIA and (relays is None
                                     or len(relays) + len(body["addrs"]) > MAX_ADDRS):
        raise RecordError("a version 2 record names 1 or 2 relays, 3 entries in all")
    relay = body["v"] == VERSION_RELAY
    if relay and (body.get("relay") is not True or not body["addrs"]
                  or len(relays or []) + len(body["addrs"]) > MAX_ADDRS):
        raise RecordError("a version 3 record says relay, names an address, 3 entries in all")
    if not relay and "relay" in body:
        raise RecordError("only a version 3 record says relay")
    if expected is not None and key != expected:
        raise RecordError("the record names another identity")
    try:
        signed = _signed_part(key, body["time"], body["addrs"], relays, relay)
        nacl.signing.VerifyKey(key).verify(signed, body["sig"])
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        raise RecordError("bad signature") from None
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if body["time"] > now + MAX_SKEW_MS:
        raise RecordError("the record is dated in the future")
    addrs, via = _dialable(body["addrs"]), _dialable(relays or [])
    if not addrs and not via:
        raise RecordError("no dialable address in the record")
    return AddressRecord(key, body["time"], tuple(addrs), raw, tuple(via), relay)


def _dialable(texts: list[str]) -> list[PeerAddr]:
    """The addresses among *texts* one can dial, each once, in order."""
    out: list[PeerAddr] = []
    for text in texts:
        try:
            addr = PeerAddr.parse(text)
        except AddressError:
            continue
        if addr not in out:
            out.append(addr)
    return out


class AddressBook:
    """The newest verified record per peer, bounded (least recently updated go first)."""

    def __init__(self, limit: int = MAX_KEPT) -> None:
        self.limit = limit
        self._records: OrderedDict[bytes, AddressRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: bytes) -> AddressRecord | None:
        """The newest record held for *key*."""
        return self._records.get(key)

    def holds(self, key: bytes, raw: bytes) -> bool:
        """True if the record held for *key* is exactly *raw* (already verified: reading
        it again would change nothing)."""
        held = self._records.get(key)
        return held is not None and held.raw == raw

    def offer(self, record: AddressRecord) -> bool:
        """Keep *record* if it is newer than the one held; True if it was kept."""
        held = self._records.get(record.key)
        if held is not None and held.time >= record.time:
            return False
        self._records.pop(record.key, None)
        self._records[record.key] = record
        while len(self._records) > self.limit:
            self._records.popitem(last=False)
        return True

    def forget(self, key: bytes) -> None:
        """Drop what is held for *key*."""
        self._records.pop(key, None)


def learn(peers: PeerList, book: AddressBook, record: AddressRecord, source: bytes) -> bool:
    """A verified *record* heard from *source* (the peer itself, or anyone passing it on).

    For a known peer, the newest record moves its row to the record's first address
    (unless the row's address is still one of those it names); True if the row moved.
    For a peer we have no row for, its first address becomes a claim that discovery
    verifies by a handshake, as any other; the record is kept only if the peer sent it
    itself (it lets discovery dial again an address that failed before the record was
    signed: a port mapping made since).
    """
    if record.key == peers.self_key:
        return False
    row = peers.get(record.key)
    if row is None:
        if source == record.key:
            book.offer(record)
        if record.addrs:  # a node reached only through relays is met some other way
            peers.claim(record.key, record.addrs[0], source)
        return False
    if not book.offer(record):
        return False
    texts = [str(a) for a in record.addrs]
    if not texts or row.addr in texts:
        return False
    row.addr = texts[0]
    peers.save(row)
    return True
