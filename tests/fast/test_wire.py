"""fluidfs.wire: typed, bounded CBOR. Hostile shapes are refused with a path saying where,
typed values come out, and decoding is bounded before cbor2 sees the bytes."""

from __future__ import annotations

from dataclasses import dataclass

import cbor2
import pytest

from fluidfs.wire import (
    IGNORE,
    Bool,
    Bytes,
    Int,
    List,
    Map,
    OneOf,
    SchemaError,
    Str,
    Tuple,
    bounds,
    cbor,
    scan,
    validate,
)


@dataclass
class Shard:
    id: bytes
    size: int


SHARD = Map({"id": Bytes(32, 32), "size": Int(0, 1000)}, into=lambda m: Shard(**m))
REQUEST = Map(
    {"shards": List(SHARD, max_len=4), "fast": Bool()},
    optional={"why": Str(max=10), "kind": OneOf("root", "lease")},
)
GOOD = {"shards": [{"id": b"i" * 32, "size": 5}], "fast": True}


def refused(schema, value, path: str, why: str) -> None:
    with pytest.raises(SchemaError) as info:
        validate(schema, value)
    assert (info.value.path, why in info.value.why) == (path, True), info.value


def test_typed_values_out() -> None:
    got = validate(REQUEST, {**GOOD, "why": "x"})
    assert got == {"shards": [Shard(b"i" * 32, 5)], "fast": True, "why": "x"}
    assert validate(Tuple(Int(), Str(), into=lambda a, b: (b, a)), [1, "a"]) == ("a", 1)


@pytest.mark.parametrize(
    ("value", "path", "why"),
    [
        ({**GOOD, "fast": 1}, "fast", "expected bool"),
        ({**GOOD, "shards": [{"id": "i" * 32, "size": 5}]}, "shards[0].id", "expected bytes"),
        ({**GOOD, "shards": [{"id": b"i" * 32, "size": True}]}, "shards[0].size",
         "expected int"),
        ({**GOOD, "shards": [{"id": b"i" * 32, "size": 5.0}]}, "shards[0].size",
         "expected int"),
        ({**GOOD, "kind": b"root"}, "kind", "is not one of"),
        ({**GOOD, "kind": "other"}, "kind", "is not one of"),
        ([GOOD], "", "expected map"),
        ({**GOOD, 5: 1}, "", "map key of type int"),
    ],
)
def test_wrong_types(value, path: str, why: str) -> None:
    refused(REQUEST, value, path, why)


def test_missing_fields_are_errors_not_defaults() -> None:
    refused(REQUEST, {"shards": []}, "", "missing key 'fast'")
    refused(REQUEST, {**GOOD, "shards": [{"id": b"i" * 32}]}, "shards[0]", "missing key 'size'")


def test_out_of_range_ints() -> None:
    refused(SHARD, {"id": b"i" * 32, "size": 1001}, "size", "not in [0, 1000]")
    refused(SHARD, {"id": b"i" * 32, "size": -1}, "size", "not in [0, 1000]")
    refused(Int(), 2**64, "", "not in")


def test_oversize_bytes_strings_and_lists() -> None:
    refused(SHARD, {"id": b"i" * 33, "size": 1}, "id", "length 33")
    refused(REQUEST, {**GOOD, "why": "x" * 11}, "why", "length 11")
    refused(REQUEST, {**GOOD, "shards": GOOD["shards"] * 5}, "shards", "5 items")
    refused(Tuple(Int(), Int()), [1, 2, 3], "", "expected 2 items")


def test_unknown_fields_refused_or_ignored_as_declared() -> None:
    refused(REQUEST, {**GOOD, "extra": 1}, "", "unknown key 'extra'")
    lenient = Map({"a": Int()}, extra=IGNORE)
    assert validate(lenient, {"a": 1, "later": [1, 2]}) == {"a": 1}
    refused(lenient, {"later": 1}, "", "missing key 'a'")


def test_into_may_refuse_combinations_and_paths_name_the_spot() -> None:
    def ordered(lo: int, hi: int) -> tuple[int, int]:
        if lo > hi:
            raise SchemaError("", "lo above hi")
        return lo, hi

    schema = Map({"ranges": List(Tuple(Int(), Int(), into=ordered), max_len=9)})
    assert validate(schema, {"ranges": [[1, 2]]}) == {"ranges": [(1, 2)]}
    refused(schema, {"ranges": [[1, 2], [3, 2]]}, "ranges[1]", "lo above hi")
    with pytest.raises(SchemaError, match=r"^args\.ranges\[0\]\[1\]: expected int"):
        validate(schema, {"ranges": [[1, "2"]]}, "args")


def test_bounds_cover_the_largest_encoding() -> None:
    largest = {"shards": [{"id": b"i" * 32, "size": 1000}] * 4, "fast": True,
               "why": "\U0001f600" * 10, "kind": "lease"}
    raw = cbor2.dumps(validate(REQUEST, largest) and largest)
    bound = bounds(REQUEST)
    assert len(raw) <= bound.size and scan(raw, 10_000) <= bound.items


def test_decode_is_bounded_before_cbor2() -> None:
    schema = List(Int(), max_len=10**6)
    small = cbor2.dumps(list(range(5)))
    assert cbor.decode(schema, small, max_size=100, max_items=10) == [0, 1, 2, 3, 4]
    with pytest.raises(SchemaError, match="more than 5"):
        cbor.decode(schema, small, max_size=5)
    many = cbor2.dumps([0] * 100_000)
    with pytest.raises(SchemaError, match="too many CBOR items"):
        cbor.decode(schema, many, max_size=1 << 20, max_items=1000)
    claims_more = b"\x9a\xff\xff\xff\xff" + b"\x00" * 10  # an array "of 4 billion items"
    with pytest.raises(SchemaError, match="too many CBOR items"):
        cbor.decode(schema, claims_more, max_size=100, max_items=1000)


def test_nesting_bombs_are_refused_whether_scanned_or_not() -> None:
    bomb = b"\x81" * 10_000 + b"\x00"  # [[[[...]]]] ten thousand deep, eleven KiB
    nested = List(List(Int(), 1), 1)
    with pytest.raises(SchemaError, match="nesting deeper"):
        cbor.decode(nested, bomb, max_size=1 << 20, max_items=1 << 20)
    with pytest.raises(SchemaError, match="not valid CBOR"):
        cbor.decode(nested, bomb, max_size=1 << 20)


@pytest.mark.parametrize(
    "raw",
    [
        cbor2.dumps(cbor2.CBORTag(1, 0)),  # a date
        cbor2.dumps({"a": 1})[:-1],  # truncated
        b"\x9f\x01\xff",  # indefinite-length array
        b"\xa2\x61a\x01\x61a\x02",  # {"a": 1, "a": 2}
        cbor2.dumps(1) + b"\x00",  # trailing bytes
    ],
)
def test_hostile_encodings(raw: bytes) -> None:
    schema = Map({"a": Int()}, extra=IGNORE)
    for items in (None, 100):
        with pytest.raises(SchemaError):
            cbor.decode(schema, raw, max_size=100, max_items=items)


def test_decode_refuses_what_is_not_bytes() -> None:
    with pytest.raises(SchemaError, match="expected CBOR bytes"):
        cbor.decode(Int(), bytearray(b"\x01"), max_size=10)


# -- long byte strings sliced out of the frame (loads_sliced) ------------------------------

SLICE = cbor.SLICE_MIN


def _plain(value):
    """*value* with every memoryview turned into bytes (what ``loads`` gives)."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@pytest.mark.parametrize("n", [0, 23, SLICE - 1, SLICE, SLICE + 1, 1 << 20])
def test_long_byte_strings_are_views_of_the_frame(n):
    body = bytes(range(256)) * (n // 256) + bytes(n % 256)
    frame = cbor2.dumps({"v": 1, "list": [b"small", body, "text" * 20000], "n": -5})
    out = cbor.loads_sliced(frame)
    assert _plain(out) == cbor.loads(frame)
    got = out["list"][1]
    if n >= SLICE:
        assert type(got) is memoryview and got.readonly and got.obj is frame
    else:
        assert type(got) is bytes
    assert type(out["list"][0]) is bytes and type(out["list"][2]) is str


def test_many_long_strings_in_order():
    bodies = [bytes([i]) * (SLICE + i) for i in range(30)]
    frame = cbor2.dumps({"shards": [{"id": bytes([i]) * 32, "data": b} for i, b in
                                    enumerate(bodies)]})
    out = cbor.loads_sliced(frame)
    assert [s["data"] for s in out["shards"]] == bodies
    assert all(type(s["data"]) is memoryview for s in out["shards"])


@pytest.mark.parametrize("frame", [
    cbor2.dumps({"a": bytes(SLICE)})[:-1],  # truncated inside the long string
    b"\xa1\x61a\xda\x66\x6c\x76\x31\x00" + bytes(SLICE),  # our own tag, from a peer
    cbor2.dumps(cbor2.CBORTag(0x666C7631, 0)) + bytes(SLICE),
    b"\xa1\x61a\x5f" + b"\x5a" + (SLICE).to_bytes(4, "big") + bytes(SLICE) + b"\xff",
    cbor2.dumps({"a": bytes(SLICE), "b": cbor2.CBORTag(2, b"\x01")}),  # a bignum tag
    b"\xa2\x61a" + cbor2.dumps(bytes(SLICE)) + b"\x61a\x01",  # duplicate key
])
def test_hostile_long_frames_are_refused_as_by_loads(frame):
    with pytest.raises(Exception) as plain:
        cbor.loads(frame)
    with pytest.raises(type(plain.value)):
        cbor.loads_sliced(frame)


def test_a_long_byte_string_as_a_map_key_is_refused():
    """cbor2 refuses a slice as a key; from ``loads`` the schema refuses the bytes key."""
    frame = b"\xa1" + cbor2.dumps(bytes(SLICE)) + b"\x01"
    with pytest.raises(cbor2.CBORDecodeError, match="map key"):
        cbor.loads_sliced(frame)
    with pytest.raises(SchemaError, match="map key"):
        validate(Map({"a": Int()}, extra=IGNORE), cbor.loads(frame))


def test_bytes_after_the_item_are_left_as_loads_leaves_them():
    """cbor2 stops after one item (``envelope.peek`` refuses the rest first)."""
    frame = cbor2.dumps({"a": bytes(SLICE)}) + b"\x00"
    assert _plain(cbor.loads_sliced(frame)) == cbor.loads(frame)


@pytest.mark.parametrize("depth", range(cbor.MAX_DEPTH - 3, cbor.MAX_DEPTH + 3))
def test_nesting_limit_is_the_same_with_long_strings(depth):
    """A slice's private tag nests one level deeper in the skeleton; the limit a peer
    meets stays that of ``loads``."""
    value: object = bytes(SLICE)
    for _ in range(depth):
        value = [value]
    frame = cbor2.dumps(value)
    try:
        want = cbor.loads(frame)
    except Exception as exc:
        with pytest.raises(type(exc)):
            cbor.loads_sliced(frame)
    else:
        assert _plain(cbor.loads_sliced(frame)) == want


def test_only_fields_that_take_views_accept_them():
    frame = cbor2.dumps({"copy": bytes(SLICE), "view": bytes(SLICE)})
    raw = cbor.loads_sliced(frame)
    takes = Map({"copy": Bytes(max=SLICE, view=True), "view": Bytes(max=SLICE, view=True)})
    assert type(validate(takes, raw)["view"]) is memoryview
    with pytest.raises(SchemaError, match="copy: expected bytes"):  # nor would cbor2 send it
        validate(Map({"copy": Bytes(max=SLICE), "view": Bytes(max=SLICE, view=True)}), raw)
    with pytest.raises(SchemaError, match="length"):
        validate(Bytes(max=SLICE - 1, view=True), raw["view"])
    with pytest.raises(SchemaError, match="writable"):
        validate(Bytes(view=True), memoryview(bytearray(4)))


def test_takes_views_finds_a_view_field_anywhere():
    from fluidfs.net.messages import OPS
    from fluidfs.wire.schema import takes_views

    assert takes_views(List(Map({"a": Int()}, optional={"b": Bytes(view=True)}), max_len=2))
    assert not takes_views(List(Map({"a": Int()}, optional={"b": Bytes()}), max_len=2))
    assert [op for op, spec in OPS.items() if takes_views(spec.response)] == ["RetrieveShard"]
    assert not any(takes_views(spec.request) for spec in OPS.values())
