"""The relay preambles: fixed-size messages on a raw TCP stream to a relay, version 1.

A relay (``fluidfs serve --relay``) splices two TCP streams so that a node nobody can
dial (behind a NAT without UPnP) can still be reached: it keeps a registration at the
relay (the ``RelayRegister`` op on an ordinary secure channel); a dialler opens a raw
stream to the relay's peer port and sends CONNECT naming the peer; the relay asks the
peer (``RelayIncoming`` with a fresh token, on the registration's connection) to open a
stream back and send ACCEPT with that token; the relay answers both with STATUS and from
then on copies bytes. The fluidfs handshake (net/handshake.py) then runs end to end over
the spliced streams, dialler as initiator pinning the peer id, so the relay sees only
HELLOs and ciphertext frames and cannot impersonate either side.

On the relay's peer port the first byte tells the two apart: a HELLO starts with ``F``
(``FLFS``), a preamble with ``R`` (``RLAY``). Formats (integers big-endian)::

    CONNECT  (40 bytes)  "RLAY" | version u8 (1) | kind u8 (1) | zero u16 | peer id (32)
    ACCEPT   (24 bytes)  "RLAY" | version u8 (1) | kind u8 (2) | zero u16 | token (16)
    STATUS   (8 bytes)   "RLAY" | version u8 (1) | kind u8 (3) | code u16

STATUS codes: 0 ok (splicing starts with the next byte), 1 the peer is not registered
here, 2 busy (a relay limit), 3 unknown or expired token, 4 the peer did not call back.
Anything else from the other side (another magic, version, kind, non-zero reserved
bytes, a short read) is a ``RelayError`` and the stream is closed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import NetError

MAGIC = b"RLAY"
VERSION = 1
KIND_CONNECT = 1
KIND_ACCEPT = 2
KIND_STATUS = 3
HEAD_LEN = 8
TOKEN_LEN = 16
CONNECT_LEN = HEAD_LEN + 32
ACCEPT_LEN = HEAD_LEN + TOKEN_LEN
STATUS_LEN = HEAD_LEN
FIRST_BYTE = MAGIC[:1]  # what tells a preamble from a HELLO (b"F") on a peer port


class RelayError(NetError):
    """Bytes that are not a valid relay preamble, or a relay that refused."""


class Status(enum.IntEnum):
    """The relay's answer to CONNECT and ACCEPT."""

    OK = 0
    NOT_REGISTERED = 1
    BUSY = 2
    BAD_TOKEN = 3
    NO_CALLBACK = 4


@dataclass(frozen=True)
class Preamble:
    """A parsed CONNECT (``value`` = the peer id) or ACCEPT (``value`` = the token)."""

    kind: int
    value: bytes


def _head(kind: int, tail: bytes = b"\x00\x00") -> bytes:
    return MAGIC + bytes([VERSION, kind]) + tail


def make_connect(peer_id: bytes) -> bytes:
    """CONNECT: reach *peer_id* through this relay."""
    if len(peer_id) != 32:
        raise ValueError("a peer id is 32 bytes")
    return _head(KIND_CONNECT) + peer_id


def make_accept(token: bytes) -> bytes:
    """ACCEPT: the stream the relay asked for with *token*."""
    if len(token) != TOKEN_LEN:
        raise ValueError(f"a relay token is {TOKEN_LEN} bytes")
    return _head(KIND_ACCEPT) + token


def make_status(status: Status) -> bytes:
    """STATUS with *status*."""
    return _head(KIND_STATUS, int(status).to_bytes(2, "big"))


def check_head(head: bytes) -> int:
    """Check the 8 common bytes; return the kind (raises ``RelayError``)."""
    if len(head) != HEAD_LEN or head[:4] != MAGIC:
        raise RelayError("not a relay preamble")
    if head[4] != VERSION:
        raise RelayError(f"unsupported relay version {head[4]} (we speak {VERSION})")
    if head[5] not in (KIND_CONNECT, KIND_ACCEPT, KIND_STATUS):
        raise RelayError(f"unknown relay message kind {head[5]}")
    if head[5] != KIND_STATUS and head[6:8] != b"\x00\x00":
        raise RelayError("reserved bytes of a relay preamble are not zero")
    return head[5]


def body_len(kind: int) -> int:
    """Bytes that follow the head of a request of *kind* (CONNECT or ACCEPT)."""
    if kind == KIND_CONNECT:
        return CONNECT_LEN - HEAD_LEN
    if kind == KIND_ACCEPT:
        return ACCEPT_LEN - HEAD_LEN
    raise RelayError("a relay takes only CONNECT and ACCEPT")


def parse_status(raw: bytes) -> Status:
    """A STATUS from the relay (raises ``RelayError`` for junk or an unknown code)."""
    if check_head(raw) != KIND_STATUS:
        raise RelayError("the relay did not answer with STATUS")
    code = int.from_bytes(raw[6:8], "big")
    try:
        return Status(code)
    except ValueError:
        raise RelayError(f"unknown relay status {code}") from None
