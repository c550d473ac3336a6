"""Repair delegations: a user lets its storage provider act on its shards at its holders.

A user U that mounts with ``--provider-repairs`` signs a delegation naming its provider P
(docs/federation.md, "Provider-side repair"). P sends it with ``AuditShard``,
``RetrieveShard`` and ``StoreShard`` to U's holders, which answer as if U had called:
the same shards, the same agreement, the same room (a delegated store counts against
U's agreement and never beyond it). ``DeleteShard`` and ``ListShards`` are not
delegated: P re-creates shards, it never removes one.

Format version 1, a CBOR map (at most ``MAX_DELEGATION`` bytes)::

    {"v": 1, "owner": U's public key (32), "delegate": P's public key (32),
     "until": Unix seconds (u63) after which it is void,
     "sig": Ed25519 signature (64) by ``owner`` over
            "fluidfs-delegation-v1\\0" || CBOR [1, owner, delegate, until]}

A holder believes a delegation only from the delegate it names (the identity the caller
proved in the handshake), before ``until``, and only for an owner it holds an agreement
with. There is no revocation besides expiry: U signs delegations for ``DEFAULT_TERM``
and signs a new one at every mount, so dropping ``--provider-repairs`` ends P's rights
within that term.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cbor2
import nacl.exceptions
import nacl.signing

from fluidfs.net.messages import MAX_DELEGATION
from fluidfs.wire import Bytes, Int, Map, SchemaError, cbor

VERSION = 1
DEFAULT_TERM = 7 * 86400.0  # seconds a delegation signed at mount stays valid
SIG_CONTEXT = b"fluidfs-delegation-v1\x00"
DELEGATED_OPS = frozenset({"AuditShard", "RetrieveShard", "StoreShard"})

SCHEMA = Map({
    "v": Int(VERSION, VERSION),
    "owner": Bytes(min=32, max=32),
    "delegate": Bytes(min=32, max=32),
    "until": Int(0, 2**63 - 1),
    "sig": Bytes(min=64, max=64),
})


class DelegationError(ValueError):
    """Bytes that are not a delegation valid for this caller now."""


@dataclass(frozen=True)
class Delegation:
    """A verified delegation: *delegate* may act on *owner*'s shards until *until*."""

    owner: bytes
    delegate: bytes
    until: int
    raw: bytes  # the signed encoding, sent as it is


def _signed_part(owner: bytes, delegate: bytes, until: int) -> bytes:
    return SIG_CONTEXT + cbor2.dumps([VERSION, owner, delegate, until])


def sign_delegation(identity: nacl.signing.SigningKey, delegate: bytes,
                    until: float | None = None) -> Delegation:
    """Sign that *delegate* may audit, retrieve and store our shards until *until*
    (Unix seconds; default ``DEFAULT_TERM`` from now)."""
    owner = bytes(identity.verify_key)
    if delegate == owner:
        raise ValueError("a delegation names someone else")
    end = int(time.time() + DEFAULT_TERM if until is None else until)
    sig = identity.sign(_signed_part(owner, delegate, end)).signature
    raw = cbor2.dumps({"v": VERSION, "owner": owner, "delegate": delegate,
                       "until": end, "sig": sig})
    return Delegation(owner, delegate, end, raw)


def read_delegation(raw: bytes, caller: bytes, now: float | None = None) -> Delegation:
    """Check bytes from anyone: the schema, the owner's signature, that *caller* is the
    delegate named and that it has not expired. Raises ``DelegationError``."""
    if type(raw) is not bytes or len(raw) > MAX_DELEGATION:
        raise DelegationError(f"a delegation has at most {MAX_DELEGATION} bytes")
    try:
        body = cbor.decode(SCHEMA, raw, max_size=MAX_DELEGATION, max_items=16)
    except SchemaError as exc:
        raise DelegationError(f"delegation: {exc}") from None
    owner, delegate, until = body["owner"], body["delegate"], body["until"]
    try:
        nacl.signing.VerifyKey(owner).verify(_signed_part(owner, delegate, until),
                                             body["sig"])
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        raise DelegationError("bad signature") from None
    if delegate != caller:
        raise DelegationError("the delegation names someone else")
    if until <= (time.time() if now is None else now):
        raise DelegationError("the delegation has expired")
    return Delegation(owner, delegate, until, raw)
