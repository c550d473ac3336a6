"""RPC envelopes (version 1): one CBOR map per channel frame.

    request   {"v": 1, "id": uint, "op": str, "args": map}
    success   {"v": 1, "id": uint, "ok": map}
    failure   {"v": 1, "id": uint, "err": {"code": str, "msg": str}}

Decoding is hardened for untrusted input: the frame is already bounded by the channel;
CBOR tags (dates, bignums, regexes, shared references, ...), indefinite-length items,
duplicate keys and non-string map keys are refused, nesting is capped at ``MAX_DEPTH``, and
the envelope's exact shape is checked before anything else looks at it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import cbor2

VERSION = 1
MAX_DEPTH = 16  # the deepest v1 message (StoreShard) nests 5 levels
MAX_OP = 64
MAX_CODE = 64
MAX_MSG = 1024
MAX_ID = 2**64 - 1

# cbor2's built-in semantic tags; each is overridden to fail (unknown tags go to tag_hook).
_BUILTIN_TAGS = (
    0,
    1,
    2,
    3,
    4,
    5,
    25,
    28,
    29,
    30,
    35,
    36,
    37,
    52,
    54,
    100,
    256,
    258,
    260,
    261,
    1004,
    43000,
    55799,
)


class _TagRefused(Exception):
    pass


def _refuse_tag(*_args: object) -> Any:
    raise _TagRefused("CBOR tags are not allowed")


_NO_TAGS = dict.fromkeys(_BUILTIN_TAGS, _refuse_tag)


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

    def __init__(self, why: str, id: int | None = None, code: str = "bad_request") -> None:
        super().__init__(why)
        self.why = why
        self.id = id
        self.code = code


def loads(frame: bytes) -> Any:
    """Decode untrusted CBOR with every hardening option on."""
    return cbor2.loads(
        frame,
        tag_hook=_refuse_tag,
        semantic_decoders=_NO_TAGS,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
    )


def _is_str(v: object, lo: int, hi: int) -> bool:
    return type(v) is str and lo <= len(v) <= hi


def decode(frame: bytes) -> Request | Response:
    """Parse one frame into a ``Request`` or ``Response``; raise ``EnvelopeError``."""
    try:
        msg = loads(frame)
    except Exception as exc:  # cbor2 raises several types, incl. ValueError/RecursionError
        raise EnvelopeError(f"not valid CBOR: {str(exc)[:200]}") from None
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


def encode_ok(id: int, result: dict[str, Any]) -> bytes:
    """Encode a success reply."""
    return cbor2.dumps({"v": VERSION, "id": id, "ok": result})


def encode_err(id: int, code: str, msg: str) -> bytes:
    """Encode an error reply; an invalid code becomes ``internal``, long messages are cut."""
    if not _is_str(code, 1, MAX_CODE):
        code = "internal"
    return cbor2.dumps({"v": VERSION, "id": id, "err": {"code": code, "msg": msg[:MAX_MSG]}})
