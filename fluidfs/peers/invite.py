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

import base64
import binascii
import re

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
    return PREFIX + base64.b32encode(record.raw).decode().rstrip("=").lower()


def read_invite(text: str) -> AddressRecord:
    """The verified address record an invite code carries; ``InviteError`` says why not."""
    code = re.sub(r"\s+", "", text)
    if not code.lower().startswith(PREFIX):
        raise InviteError(f"not an invite code: it should start with {PREFIX}")
    if len(code) > MAX_CODE:
        raise InviteError(f"not an invite code: longer than {MAX_CODE} characters")
    body = code[len(PREFIX):].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise InviteError("not an invite code: mistyped (not base32)") from None
    try:
        return read_record(raw)
    except RecordError as exc:
        raise InviteError(f"not a valid invite code (mistyped or altered?): {exc}") from None
