"""Journal entries: a provider's signed word that it moved one of a customer's shards.

While a customer U is away, its provider P re-creates shards U's holders lost and places
them on U's other partners (service/customer_repair.py). Each move is one entry, which U
fetches when it comes back (``FetchJournal``), verifies and merges into its block records
(blocks/provider_journal.py), then acknowledges (``AckJournal``) so P drops it.

Format version 1, a CBOR map (at most ``MAX_ENTRY`` bytes)::

    {"v": 1, "provider": P (32), "customer": U (32), "seq": u64 (1, 2, ... per customer),
     "block": block id (32), "index": shard index (0..254), "shard": its id (32),
     "old": the holder it was lost at (32, or b"" for none), "new": its new holder (32),
     "time": Unix seconds (u63),
     "sig": Ed25519 signature (64) by ``provider`` over
            "fluidfs-repair-journal-v1\\0" || CBOR [1, provider, customer, seq, block,
                                                   index, shard, old, new, time]}

An entry says nothing U could not check: the shard keeps its id (U compares it with its
record), and the new holder is a partner U itself named to P.
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2
import nacl.exceptions
import nacl.signing

from fluidfs.wire import Bytes, Int, Map, SchemaError, cbor

VERSION = 1
MAX_ENTRY = 512  # the encoding is ~330 bytes
SIG_CONTEXT = b"fluidfs-repair-journal-v1\x00"

_ID = Bytes(min=32, max=32)
SCHEMA = Map({
    "v": Int(VERSION, VERSION), "provider": _ID, "customer": _ID, "seq": Int(1, 2**64 - 1),
    "block": _ID, "index": Int(0, 254), "shard": _ID, "old": Bytes(max=32), "new": _ID,
    "time": Int(0, 2**63 - 1), "sig": Bytes(min=64, max=64),
})


class JournalError(ValueError):
    """Bytes that are not an entry signed by the expected provider for us."""


@dataclass(frozen=True)
class Move:
    """One verified entry: shard *index* (id *shard*) of *block* moved *old* → *new*."""

    seq: int
    block: bytes
    index: int
    shard: bytes
    old: bytes
    new: bytes
    time: int


def _signed_part(provider: bytes, customer: bytes, move: Move) -> bytes:
    return SIG_CONTEXT + cbor2.dumps([VERSION, provider, customer, move.seq, move.block,
                                      move.index, move.shard, move.old, move.new, move.time])


def sign_move(identity: nacl.signing.SigningKey, customer: bytes, move: Move) -> bytes:
    """The signed entry for *move*, made by the provider *identity* for *customer*."""
    provider = bytes(identity.verify_key)
    sig = identity.sign(_signed_part(provider, customer, move)).signature
    return cbor2.dumps({"v": VERSION, "provider": provider, "customer": customer,
                        "seq": move.seq, "block": move.block, "index": move.index,
                        "shard": move.shard, "old": move.old, "new": move.new,
                        "time": move.time, "sig": sig})


def read_move(raw: bytes, provider: bytes, customer: bytes) -> Move:
    """Check an entry from the provider: the schema, that it names *provider* and
    *customer*, and *provider*'s signature. Raises ``JournalError``."""
    if type(raw) is not bytes or len(raw) > MAX_ENTRY:
        raise JournalError(f"a journal entry has at most {MAX_ENTRY} bytes")
    try:
        body = cbor.decode(SCHEMA, raw, max_size=MAX_ENTRY, max_items=32)
    except SchemaError as exc:
        raise JournalError(f"journal entry: {exc}") from None
    if body["provider"] != provider or body["customer"] != customer:
        raise JournalError("the entry names another provider or customer")
    if len(body["old"]) not in (0, 32):
        raise JournalError("the old holder is an id or nothing")
    move = Move(body["seq"], body["block"], body["index"], body["shard"], body["old"],
                body["new"], body["time"])
    try:
        nacl.signing.VerifyKey(provider).verify(_signed_part(provider, customer, move),
                                                body["sig"])
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        raise JournalError("bad signature") from None
    return move
