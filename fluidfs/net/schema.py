"""A tiny validation DSL for decoded CBOR (or any plain Python data).

    ID = Bytes(min=32, max=32)
    REQ = Map({"ids": List(ID, max_len=1024)}, optional={"why": Str(max=200)})
    validate(REQ, value)          # returns value, or raises SchemaError(path, why)

Only ``bytes``, ``int`` (never ``bool``), ``str``, ``bool``, ``list`` and ``dict`` with
``str`` keys are accepted; unknown map keys are rejected. Every schema is bounded, so
validating a value costs at most its size (cycles cannot make it loop).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

__all__ = ["Bool", "Bytes", "Int", "List", "Map", "Schema", "SchemaError", "Str", "validate"]


class SchemaError(ValueError):
    """``value`` at ``path`` (e.g. ``"shards[3].id"``) does not fit its schema: ``why``."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path or '<root>'}: {why}")
        self.path = path
        self.why = why


def _kind(value: object) -> str:
    return type(value).__name__


class Schema(abc.ABC):
    """Base class: subclasses implement ``check(value, path)``."""

    @abc.abstractmethod
    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` fits."""


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


class Bool(Schema):
    """``True`` or ``False``."""

    def check(self, value: Any, path: str) -> None:
        """Raise ``SchemaError`` unless ``value`` is a bool."""
        if type(value) is not bool:
            raise SchemaError(path, f"expected bool, got {_kind(value)}")


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


def validate(schema: Schema, value: Any, path: str = "") -> Any:
    """Return ``value`` if it fits ``schema``; raise ``SchemaError(path, why)`` otherwise."""
    schema.check(value, path)
    return value
