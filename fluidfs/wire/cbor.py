"""Bounded, hardened CBOR decoding for anything that crossed a wire or a disk.

``decode(schema, data, max_size=..., max_items=...)`` is the one way in:

1. ``data`` longer than ``max_size`` is refused before anything looks at it;
2. with ``max_items``, ``scan`` walks the structure in pure Python without building
   anything — skipping string bodies without copying them — and stops as soon as more
   than ``max_items`` data items or ``MAX_DEPTH`` levels are passed, so its cost is
   bounded by the item cap whatever the size;
3. cbor2 decodes with every hardening option on (``loads``): CBOR tags (dates, bignums,
   regexes, shared references, ...), indefinite-length items, duplicate keys and
   unhashable map keys are refused, nesting is capped at ``MAX_DEPTH``;
4. the value is checked and typed by its schema (fluidfs.wire.schema).

Any fault is a ``SchemaError`` (path ``""`` for a fault of the encoding itself).
Callers that handle untrusted frames of several MiB decode them off the event loop
(net/rpc.py does so from ``NetLimits.decode_offload`` bytes).
"""

from __future__ import annotations

from typing import Any

import cbor2

from fluidfs.wire.schema import Schema, SchemaError

__all__ = [
    "MAX_DEPTH", "SLICE_MIN", "ScanError", "decode", "loads", "loads_sliced", "read_arg",
    "scan", "skip",
]  # fmt: skip

MAX_DEPTH = 16  # the deepest message we write (a StoreShard request) nests 5 levels
#: byte strings at least this long are sliced out of the frame by ``loads_sliced``;
#: cbor2 reads strings from this size in 64 KiB chunks and joins them (two copies)
SLICE_MIN = 64 << 10
_SLICE_TAG = 0x66_6C_76_31  # b"flv1": only ever in a skeleton ``loads_sliced`` builds
assert _SLICE_TAG > 0xFFFF  # a 4-byte tag head below

# cbor2's built-in semantic tags; each is overridden to fail (unknown tags go to tag_hook).
_BUILTIN_TAGS = (
    0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
    43000, 55799,
)  # fmt: skip


class _TagRefused(Exception):
    pass


def _refuse_tag(*_args: object) -> Any:
    raise _TagRefused("CBOR tags are not allowed")


_NO_TAGS = dict.fromkeys(_BUILTIN_TAGS, _refuse_tag)


def loads(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Decode untrusted CBOR with every hardening option on (raises cbor2's errors,
    ``ValueError`` or ``RecursionError``; ``decode`` turns them into ``SchemaError``)."""
    return cbor2.loads(
        data,
        tag_hook=_refuse_tag,
        semantic_decoders=_NO_TAGS,
        max_depth=max_depth,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
    )


def loads_sliced(data: bytes, max_depth: int = MAX_DEPTH, min_len: int = SLICE_MIN) -> Any:
    """``loads``, except that byte strings of at least *min_len* bytes come back as
    read-only ``memoryview`` slices of *data* instead of copies.

    The other bytes are copied into a skeleton in which each long string is replaced by
    a private tag around its number; cbor2 decodes that with the same hardening, and the
    tags become the slices. A frame the walk refuses (or one with no long string) goes
    to ``loads`` as it is, which refuses it in its own words. Everything that bounds a
    decoded value still holds: the slices share *data*, whose size the caller counted.
    """
    if len(data) < min_len or type(data) is not bytes:
        return loads(data, max_depth)
    spans: list[tuple[int, int, int]] = []
    try:  # every item takes a byte at least: a budget of len(data) is never the limit
        end, _ = skip(data, 0, len(data), len(data), 0, max_depth, (min_len, spans))
    except ScanError:
        end = -1
    if end != len(data) or not spans:
        return loads(data, max_depth)
    whole = memoryview(data)
    views = []
    parts = []
    last = 0
    for number, (head, body, stop) in enumerate(spans):
        parts.append(data[last:head])
        parts.append(b"\xda" + _SLICE_TAG.to_bytes(4, "big") + _uint(number))
        views.append(whole[body:stop])
        last = stop
    parts.append(data[last:])

    def slice_hook(tag: cbor2.CBORTag, _immutable: bool) -> Any:
        if tag.tag == _SLICE_TAG and type(tag.value) is int and 0 <= tag.value < len(views):
            return views[tag.value]
        raise _TagRefused("CBOR tags are not allowed")  # pragma: no cover - walk refused

    return cbor2.loads(
        b"".join(parts),
        tag_hook=slice_hook,
        semantic_decoders=_NO_TAGS,
        max_depth=max_depth + 1,  # a slice's tag nests one deeper; the walk checked depth
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
    )


def _uint(n: int) -> bytes:
    """The CBOR encoding of the unsigned integer *n* (< 2**32)."""
    if n < 24:
        return bytes([n])
    for code, size in ((24, 1), (25, 2), (26, 4)):
        if n < 1 << (8 * size):
            return bytes([code]) + n.to_bytes(size, "big")
    raise ValueError("too many slices")


class ScanError(ValueError):
    """A structure refused by ``scan``/``skip``; ``too_many`` if for its item count."""

    def __init__(self, why: str, too_many: bool = False) -> None:
        super().__init__(why)
        self.too_many = too_many


def read_arg(data: bytes, pos: int, ai: int, end: int) -> tuple[int, int]:
    """The argument of a CBOR head whose additional info is ``ai`` and whose argument
    starts at ``pos``; returns (value, position after it)."""
    if ai < 24:
        return ai, pos
    if ai > 27:
        raise ScanError("indefinite-length or reserved CBOR item")
    n = 1 << (ai - 24)
    if pos + n > end:
        raise ScanError("CBOR item runs past the end")
    return int.from_bytes(data[pos : pos + n], "big"), pos + n


def skip(
    data: bytes,
    pos: int,
    end: int,
    budget: int,
    depth: int,
    max_depth: int = MAX_DEPTH,
    long_bytes: tuple[int, list[tuple[int, int, int]]] | None = None,
) -> tuple[int, int]:
    """Walk the data item at ``pos`` (at nesting level ``depth + 1``), building nothing.

    Returns (position after it, ``budget`` minus the items walked). Raises ``ScanError``
    for tags, indefinite lengths, truncation, nesting past ``max_depth`` or more items
    than ``budget``. Costs O(items walked), whatever the strings' lengths. With
    ``long_bytes = (min_len, found)``, each byte string of at least ``min_len`` bytes
    is appended to ``found`` as (head position, body position, end).
    """
    stack = [1]  # items still to walk at each open level
    while stack:
        if not stack[-1]:
            stack.pop()
            continue
        stack[-1] -= 1
        budget -= 1
        if budget < 0:
            raise ScanError("too many CBOR items", too_many=True)
        if pos >= end:
            raise ScanError("CBOR item runs past the end")
        ib = data[pos]
        major, ai = ib >> 5, ib & 31
        if major == 7 and ai == 31:
            raise ScanError("indefinite-length CBOR item")
        head = pos
        value, pos = read_arg(data, pos + 1, ai, end)
        if major <= 1 or major == 7:  # integer, simple value or float
            continue
        if major <= 3:  # byte or text string: skip its body
            if value > end - pos:
                raise ScanError("CBOR string runs past the end")
            if long_bytes is not None and major == 2 and value >= long_bytes[0]:
                long_bytes[1].append((head, pos, pos + value))
            pos += value
        elif major <= 5:  # array or map
            count = value if major == 4 else 2 * value
            if count > budget:
                raise ScanError("too many CBOR items", too_many=True)
            if count:
                if depth + len(stack) >= max_depth:
                    raise ScanError(f"CBOR nesting deeper than {max_depth}")
                stack.append(count)
        else:
            raise ScanError("CBOR tags are not allowed")
    return pos, budget


def scan(data: bytes, max_items: int, max_depth: int = MAX_DEPTH) -> int:
    """The number of data items in ``data`` (exactly one top-level item, nothing after
    it); ``ScanError`` past ``max_items`` items or ``max_depth`` levels."""
    pos, left = skip(data, 0, len(data), max_items, 0, max_depth)
    if pos != len(data):
        raise ScanError("bytes after the CBOR item")
    return max_items - left


def decode(
    schema: Schema,
    data: bytes,
    *,
    max_size: int,
    max_items: int | None = None,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Decode untrusted ``data`` into the typed value ``schema`` describes (see above).

    ``max_items`` adds the pure-Python prescan; leave it out for data that is
    authenticated before it is decoded (our own encrypted metadata), where the size
    cap is the bound and cbor2 is many times faster than the scan.
    """
    if type(data) is not bytes:
        raise SchemaError("", f"expected CBOR bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise SchemaError("", f"{len(data)} bytes of CBOR, more than {max_size}")
    try:
        if max_items is not None:
            scan(data, max_items, max_depth)
        value = loads(data, max_depth)
    except Exception as exc:  # cbor2 raises several types, incl. ValueError/RecursionError
        raise SchemaError("", f"not valid CBOR: {str(exc)[:200]}") from None
    return schema.parse(value)
