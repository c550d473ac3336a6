"""Invite codes: how a friend's node meets this one with nobody able to step in between.

Format version 1::

    "ffi1-" || lowercase base32 (RFC 4648, no padding) of the node's address record

The address record (peers/addrrecord.py: CBOR, at most 640 bytes) names the node's
identity and the addresses it can be reached at, best first, signed by that identity. The
code therefore carries the peer id to pin as well as where to dial it, and a mistyped or
altered code fails the signature. ``fluidfs peers add CODE`` dials the addresses in
order, each time requiring the node that answers to prove that identity in the handshake
(before we sign anything ourselves): a node at the address with any other identity is
refused, so first contact cannot be intercepted by whoever holds the address. Whitespace
in a pasted code is ignored; letters may be of either case.
"""

from __future__ import annotations

from fluidfs.peers import codetext
from fluidfs.peers.addrrecord import MAX_RECORD, AddressRecord, RecordError, read_record

PREFIX = "ffi1-"
MAX_CODE = len(PREFIX) + -(-MAX_RECORD * 8 // 5)  # base32 of the largest record


class InviteError(ValueError):
    """Text that is not a valid invite code."""


def is_invite(text: str) -> bool:
    """True if *text* is meant as an invite code (not HOST:PORT)."""
    return text.strip().lower().startswith(PREFIX)


def invite_code(record: AddressRecord) -> str:
    """The invite code of this node's signed address *record*."""
    return codetext.encode(PREFIX, record.raw)


def read_invite(text: str) -> AddressRecord:
    """The verified address record an invite code carries; ``InviteError`` says why not."""
    raw = codetext.decode(text, PREFIX, MAX_CODE, "an invite code", InviteError)
    try:
        return read_record(raw)
    except RecordError as exc:
        raise InviteError(f"not a valid invite code (mistyped or altered?): {exc}") from None
