"""A tiny validation DSL for decoded CBOR (or any plain Python data).

    ID = Bytes(min=32, max=32)
    REQ = Map({"ids": List(ID, max_len=1024)}, optional={"why": Str(max=200)})
    validate(REQ, value)          # returns value, or raises SchemaError(path, why)

Only ``bytes``, ``int`` (never ``bool``), ``str``, ``bool``, ``list`` and ``dict`` with
``str`` keys are accepted; unknown map keys are rejected. Every schema is bounded, so
validating a value costs at most its size (cycles cannot make it loop).

Because every schema is bounded, ``bounds(schema)`` gives the most CBOR bytes and items
any fitting value can take, whatever encoder the peer used (every head counted at its
longest, 9 bytes; text at 4 bytes a character). The RPC layer refuses a message larger
than its op allows before decoding it.
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = [
    "Bool",
    "Bound",
    "Bytes",
    "Int",
    "List",
    "Map",
    "Schema",
    "SchemaError",
    "Str",
    "bounds",
    "validate",
]


class SchemaError(ValueError):
    """``value`` at ``path`` (e.g. ``"shards[3].id"``) does not fit its schema: ``why``."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path or '<root>'}: {why}")
        self.path = path
        self.why = why


def _kind(value: object) -> str:
    return type(value).__name__


HEAD = 9  # the longest CBOR head: initial byte + 8-byte argument


class Bound(NamedTuple):
    """The most a value fitting a schema can take on the wire: CBOR bytes and data items."""

    size: int
    items: int


class Schema(abc.ABC):
    """Base class: subclasses implement ``check(value, path)`` and ``bound()``."""

    @abc.abstractmethod
    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` fits."""

    @abc.abstractmethod
    def bound(self) -> Bound:
        """The largest CBOR encoding of any value that fits (see ``bounds``)."""


class Bytes(Schema):
    """A byte string with ``min <= len <= max``."""

    def __init__(self, min: int = 0, max: int = 1 << 20) -> None:
        self.min, self.max = min, max

    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` is bytes of an allowed length."""
        if type(value) is not bytes:
            raise SchemaError(path, f"expected bytes, got {_kind(value)}")
        if not self.min <= len(value) <= self.max:
            raise SchemaError(path, f"length {len(value)} not in [{self.min}, {self.max}]")

    def bound(self) -> Bound:
        """Head plus ``max`` bytes."""
        return Bound(HEAD + self.max, 1)


class Int(Schema):
    """An integer (``bool`` excluded) with ``min <= value <= max``."""

    def __init__(self, min: int = 0, max: int = 2**64 - 1) -> None:
        self.min, self.max = min, max

    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` is an int in range."""
        if type(value) is not int:
            raise SchemaError(path, f"expected int, got {_kind(value)}")
        if not self.min <= value <= self.max:
            raise SchemaError(path, f"{value} not in [{self.min}, {self.max}]")

    def bound(self) -> Bound:
        """One head."""
        return Bound(HEAD, 1)


class Str(Schema):
    """A text string of ``min <= len <= max`` characters."""

    def __init__(self, max: int = 1024, min: int = 0) -> None:
        self.min, self.max = min, max

    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` is a str of an allowed length."""
        if type(value) is not str:
            raise SchemaError(path, f"expected str, got {_kind(value)}")
        if not self.min <= len(value) <= self.max:
            raise SchemaError(path, f"length {len(value)} not in [{self.min}, {self.max}]")

    def bound(self) -> Bound:
        """Head plus ``max`` characters of up to 4 UTF-8 bytes each."""
        return Bound(HEAD + 4 * self.max, 1)


class Bool(Schema):
    """``True`` or ``False``."""

    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` is a bool."""
        if type(value) is not bool:
            raise SchemaError(path, f"expected bool, got {_kind(value)}")

    def bound(self) -> Bound:
        """One head."""
        return Bound(HEAD, 1)


class List(Schema):
    """A list of ``item`` with ``min_len <= len <= max_len``."""

    def __init__(self, item: Schema, max_len: int, min_len: int = 0) -> None:
        self.item, self.max_len, self.min_len = item, max_len, min_len

    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` is a list whose items all fit."""
        if type(value) is not list:
            raise SchemaError(path, f"expected list, got {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise SchemaError(path, f"{len(value)} items not in [{self.min_len}, {self.max_len}]")
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]")

    def bound(self) -> Bound:
        """Head plus ``max_len`` items at their bound."""
        item = self.item.bound()
        return Bound(HEAD + self.max_len * item.size, 1 + self.max_len * item.items)


class Map(Schema):
    """A dict with exactly the ``fields`` keys plus any of the ``optional`` keys."""

    def __init__(
        self, fields: Mapping[str, Schema], optional: Mapping[str, Schema] | None = None
    ) -> None:
        self.fields = dict(fields)
        self.optional = dict(optional or {})
        overlap = self.fields.keys() & self.optional.keys()
        if overlap:
            raise ValueError(f"keys both required and optional: {sorted(overlap)}")

    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` is a dict with the right keys and values."""
        if type(value) is not dict:
            raise SchemaError(path, f"expected map, got {_kind(value)}")
        prefix = f"{path}." if path else ""
        for key in value:
            if type(key) is not str:
                raise SchemaError(path, f"map key of type {_kind(key)}")
            if key not in self.fields and key not in self.optional:
                raise SchemaError(path, f"unknown key {key[:64]!r}")
        for key, schema in self.fields.items():
            if key not in value:
                raise SchemaError(path, f"missing key {key!r}")
            schema.check(value[key], prefix + key)
        for key, schema in self.optional.items():
            if key in value:
                schema.check(value[key], prefix + key)

    def bound(self) -> Bound:
        """Head plus every key (required and optional) and its value at their bound."""
        size, items = HEAD, 1
        for key, schema in (*self.fields.items(), *self.optional.items()):
            value = schema.bound()
            size += HEAD + len(key.encode()) + value.size
            items += 1 + value.items
        return Bound(size, items)


def bounds(schema: Schema) -> Bound:
    """The most CBOR bytes and items any value fitting ``schema`` can take (cached)."""
    cached = _BOUNDS.get(schema)
    if cached is None:
        cached = _BOUNDS[schema] = schema.bound()
    return cached


_BOUNDS: weakref.WeakKeyDictionary[Schema, Bound] = weakref.WeakKeyDictionary()


def validate(schema: Schema, value: Any, path: str = "") -> Any:
    """Return ``value`` if it fits ``schema``; raise ``SchemaError(path, why)`` otherwise."""
    schema.check(value, path)
    return value
