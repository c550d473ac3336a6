"""RPC envelopes (version 1): one CBOR map per channel frame.

    request   {"v": 1, "id": uint, "op": str, "args": map}
    success   {"v": 1, "id": uint, "ok": map}
    failure   {"v": 1, "id": uint, "err": {"code": str, "msg": str}}

Decoding is hardened for untrusted input (fluidfs.wire.cbor): the frame is already bounded
by the channel; CBOR tags (dates, bignums, regexes, shared references, ...),
indefinite-length items, duplicate keys and non-string map keys are refused, nesting is
capped at ``MAX_DEPTH``, and the envelope's exact shape is checked before anything else
looks at it. The ``args``/``ok`` maps are then checked by their op's schema (net/rpc.py).

Before cbor2 sees a frame, ``peek`` walks its structure in pure Python without building
anything: it reads the head fields (``v``, ``id``, ``op``), skips over string bodies without
copying them, counts the data items of the body (``args``/``ok``/``err``) and stops as soon
as ``max_items`` or ``MAX_DEPTH`` is passed, so its cost is bounded by the item cap whatever
the frame's size. A decoded message then takes at most its length plus a fixed overhead per
counted item, which is what the RPC layer charges to the peer's memory budget; it also
compares the counts with the op's bounds (``fluidfs.wire.schema.bounds``) and may refuse a
message from its ``Head`` alone, without decoding it.

In a reply whose op's schema declares ``Bytes(view=True)`` (RetrieveShard's shard), byte
strings of at least ``wire.cbor.SLICE_MIN`` (64 KiB) are not copied out of the frame: they
decode to read-only memoryviews of it (net/rpc.py asks ``decode`` for that).

A request may be encoded in two parts (``encode_request_parts``): the CBOR up to and
including the head of its last byte string, and that byte string's own buffer. The
bytes on the wire are exactly ``encode_request``'s; the channel encrypts the parts one
after the other, so a shard goes from the buffer it was sealed into straight into its
frame (issue 16: each copy of a shard cost the mount about 0.5 CPU-s per GiB stored).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import cbor2

from fluidfs.wire.cbor import MAX_DEPTH, ScanError, loads, loads_sliced, read_arg, skip

Buffer = bytes | bytearray | memoryview

__all__ = [
    "MAX_DEPTH",
    "TAIL",
    "EnvelopeError",
    "Head",
    "Request",
    "Response",
    "decode",
    "encode_err",
    "encode_ok",
    "encode_request",
    "encode_request_parts",
    "loads",
    "peek",
]

VERSION = 1
MAX_ITEMS = 4096  # data items in one message; the largest v1 message has ~1,300
MAX_TOP_KEYS = 16  # keys of the envelope map that peek reads before giving up
MAX_OP = 64
MAX_CODE = 64
MAX_MSG = 1024
MAX_ID = 2**64 - 1


class Request(NamedTuple):
    """A decoded request."""

    id: int
    op: str
    args: dict[str, Any]


class Response(NamedTuple):
    """A decoded reply: exactly one of ``ok`` and ``err`` (``(code, msg)``) is set."""

    id: int
    ok: dict[str, Any] | None
    err: tuple[str, str] | None


class EnvelopeError(Exception):
    """A message that is not a valid envelope. ``id`` is set when it could be recovered,
    so the receiver can answer with error ``code``; otherwise the connection is dropped."""

    def __init__(
        self, why: str, id: int | None = None, code: str = "bad_request", reply: bool = False
    ) -> None:
        super().__init__(why)
        self.why = why
        self.id = id
        self.code = code
        self.reply = reply  # the message looked like a reply (has ok/err, no op)


class Head(NamedTuple):
    """What ``peek`` learnt about a frame without decoding it.

    ``op`` is set if the message has an ``op`` key (a request; ``""`` if its value is not
    a usable op name); ``reply`` is true if it has ``ok`` or ``err`` and no ``op``.
    ``items`` counts the data items of the whole message, the envelope's own included.
    """

    id: int
    op: str | None
    reply: bool
    items: int


def _text_at(frame: bytes, pos: int, end: int, most: int) -> str | None:
    """The text string at ``pos`` if it is one of at most ``most`` UTF-8 bytes."""
    ib = frame[pos]
    if ib >> 5 != 3:
        return None
    n, start = read_arg(frame, pos + 1, ib & 31, end)
    if n > most or n > end - start:
        return None
    try:
        return frame[start : start + n].decode()
    except UnicodeDecodeError:
        return None


def peek(frame: bytes, max_items: int = MAX_ITEMS) -> Head:
    """Check a frame's structure and read its head (id, op, item count) without decoding.

    Raises ``EnvelopeError`` for anything that is refused on structure alone: not a map,
    a repeated envelope key, truncation, trailing bytes, tags,
    indefinite lengths, nesting past ``MAX_DEPTH`` and more than ``max_items`` items
    (code ``too_large``). The error carries the id when it was read before the fault.
    """
    end = len(frame)
    mid: int | None = None
    op: str | None = None
    items = 1
    seen: set[str] = set()
    try:
        if not end or frame[0] >> 5 != 5:
            raise ScanError("message is not a map")
        pairs, pos = read_arg(frame, 1, frame[0] & 31, end)
        if pairs > MAX_TOP_KEYS:
            raise ScanError("message map has too many keys")
        for _ in range(pairs):
            if pos >= end:
                raise ScanError("CBOR item runs past the end of the frame")
            key = _text_at(frame, pos, end, 8)  # None: not one of ours (decode says so)
            if key is not None:
                if key in seen:
                    mid = None  # we cannot tell which id the sender meant
                    raise ScanError("duplicate envelope key")
                seen.add(key)
            pos, left = skip(frame, pos, end, max_items - items, 1)
            start = pos
            pos, left = skip(frame, pos, end, left, 1)
            items = max_items - left
            if key == "id" and frame[start] >> 5 == 0:
                mid = read_arg(frame, start + 1, frame[start] & 31, end)[0]
            elif key == "op":
                op = _text_at(frame, start, end, 4 * MAX_OP) or ""  # "": decode() says why
        if pos != end:
            raise ScanError("bytes after the message")
    except ScanError as exc:
        if mid is None:
            raise EnvelopeError(f"not a valid envelope: {exc}") from None
        code = "too_large" if exc.too_many else "bad_request"
        reply = op is None and bool({"ok", "err"} & seen)
        raise EnvelopeError(f"not a valid envelope: {exc}", mid, code, reply) from None
    if mid is None:
        raise EnvelopeError("message has no valid id")
    reply = op is None and ("ok" in seen or "err" in seen)
    return Head(mid, op, reply, items)


def _is_str(v: object, lo: int, hi: int) -> bool:
    return type(v) is str and lo <= len(v) <= hi


def decode(frame: bytes, head: Head | None = None, views: bool = False) -> Request | Response:
    """Parse one frame into a ``Request`` or ``Response``; raise ``EnvelopeError``.

    ``head`` is ``peek(frame)`` if the caller already has it; otherwise ``peek`` runs
    first, so cbor2 never sees a frame with more than ``MAX_ITEMS`` items. ``views``:
    byte strings of ``SLICE_MIN`` bytes or more come back as read-only views of *frame*
    (``wire.cbor.loads_sliced``), for a message whose schema takes them.
    """
    if head is None:
        head = peek(frame)
    try:
        msg = loads_sliced(frame) if views else loads(frame)
    except Exception as exc:  # cbor2 raises several types, incl. ValueError/RecursionError
        raise EnvelopeError(f"not valid CBOR: {str(exc)[:200]}", head.id) from None
    if type(msg) is not dict:
        raise EnvelopeError("message is not a map")
    mid = msg.get("id")
    if type(mid) is not int or not 0 <= mid <= MAX_ID:
        raise EnvelopeError("message has no valid id")
    if msg.get("v") != VERSION or type(msg.get("v")) is not int:
        raise EnvelopeError(f"envelope version must be {VERSION}", mid, "bad_version")
    keys = msg.keys()
    if "op" in msg:
        if keys != {"v", "id", "op", "args"}:
            raise EnvelopeError("request must have exactly v, id, op, args", mid)
        op, args = msg["op"], msg["args"]
        if not _is_str(op, 1, MAX_OP):
            raise EnvelopeError("op must be a non-empty string of at most 64 characters", mid)
        if type(args) is not dict:
            raise EnvelopeError("args must be a map", mid)
        return Request(mid, op, args)
    if keys == {"v", "id", "ok"}:
        if type(msg["ok"]) is not dict:
            raise EnvelopeError("ok must be a map", mid)
        return Response(mid, msg["ok"], None)
    if keys == {"v", "id", "err"}:
        err = msg["err"]
        if (
            type(err) is not dict
            or err.keys() != {"code", "msg"}
            or not _is_str(err["code"], 1, MAX_CODE)
            or not _is_str(err["msg"], 0, MAX_MSG)
        ):
            raise EnvelopeError("err must be {code: str, msg: str}", mid)
        return Response(mid, None, (err["code"], err["msg"]))
    raise EnvelopeError("message is neither a request nor a reply", mid)


def encode_request(id: int, op: str, args: dict[str, Any]) -> bytes:
    """Encode a request envelope."""
    return cbor2.dumps({"v": VERSION, "id": id, "op": op, "args": args})


class _Tail:
    """The place of a request's last byte string (see ``encode_request_parts``)."""

    def __repr__(self) -> str:
        return "TAIL"


#: stands in ``args`` for the byte string ``encode_request_parts`` sends from its buffer
TAIL = _Tail()


def _bstr_head(n: int) -> bytes:
    """The CBOR head of a byte string of *n* bytes (major type 2)."""
    if n < 24:
        return bytes([0x40 | n])
    for code, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([0x40 | code]) + n.to_bytes(size, "big")
    raise ValueError("byte string too long for CBOR")


def encode_request_parts(
    id: int, op: str, args: dict[str, Any], tail: Buffer
) -> tuple[bytes, Buffer]:
    """A request whose ``args`` hold ``TAIL`` once, as the last item encoded, with *tail*'s
    bytes there: ``(head, tail)``, and ``head + tail`` is what ``encode_request`` gives
    with *tail* in place of ``TAIL``.

    Raises ValueError if ``TAIL`` is missing or not the last item encoded (the request
    is encoded with two different placeholders: only then do the encodings differ in
    nothing but their last bytes).
    """
    seen = []

    def stand_in(placeholder: bytes):
        def hook(encoder: cbor2.CBOREncoder, value: Any) -> None:
            if value is not TAIL:
                raise cbor2.CBOREncodeTypeError(f"cannot encode {type(value).__name__}")
            seen.append(value)
            encoder.encode(placeholder)

        return hook

    msg = {"v": VERSION, "id": id, "op": op, "args": args}
    empty = cbor2.dumps(msg, default=stand_in(b""))
    one = cbor2.dumps(msg, default=stand_in(b"\0"))
    if len(seen) != 2 or empty[:-1] + b"\x41\x00" != one or empty[-1:] != b"\x40":
        raise ValueError("TAIL must be in args once, as the last item encoded")
    return empty[:-1] + _bstr_head(memoryview(tail).nbytes), tail


def encode_ok(id: int, result: dict[str, Any]) -> bytes:
    """Encode a success reply."""
    return cbor2.dumps({"v": VERSION, "id": id, "ok": result})


def encode_err(id: int, code: str, msg: str) -> bytes:
    """Encode an error reply; an invalid code becomes ``internal``, long messages are cut."""
    if not _is_str(code, 1, MAX_CODE):
        code = "internal"
    return cbor2.dumps({"v": VERSION, "id": id, "err": {"code": code, "msg": msg[:MAX_MSG]}})
