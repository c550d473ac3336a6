"""Schemas: what a decoded CBOR value must look like, and the typed value it becomes.

    ID = Bytes(min=32, max=32)
    REQ = Map({"ids": List(ID, max_len=1024)}, optional={"why": Str(max=200)})
    validate(REQ, value)          # the checked value; raises SchemaError(path, why)

Kinds: ``Bytes``, ``Str``, ``Int`` (never ``bool``), ``Bool``, ``OneOf`` (one of a few
literal values, e.g. a version number or a kind name), ``List`` (items of one schema),
``Tuple`` (a fixed-length array whose items each have their own schema) and ``Map``
(``str`` keys). Types are exact: a subclass, a float for an int, a list for bytes is
refused.

Typed values out: ``Tuple`` and ``Map`` take ``into``, a callable that builds the value
the caller wants (a dataclass, a NamedTuple) from the checked parts; it may refuse a
combination the parts cannot express (raise ``SchemaError("", why)``; the path is added
on the way out). ``validate`` returns what ``into`` built, or the checked plain value.

Missing and unknown keys: a required key that is missing is an error (never a default);
an optional key that is absent is absent from the checked map, so defaults are the
``into``'s, spelled out. Unknown keys are refused (``extra=REFUSE``, the default: a peer
speaks exactly our version) or dropped (``extra=IGNORE``, where a later version of
fluidfs itself may add keys: metadata nodes, the bodies of our own records).

Bounded: every schema has a largest value, so checking costs at most the value's size
(cycles cannot make it loop), and ``bounds(schema)`` gives the most CBOR bytes and items
any fitting value can take, whatever encoder wrote it (every head counted at its
longest, 9 bytes; text at 4 bytes a character). The RPC layer refuses a message larger
than its op allows before decoding it.

Error paths (``"shards[3].id"``) are built only when a check fails, on the way out of
the containers, so a value that fits allocates no path strings.
"""

from __future__ import annotations

import abc
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = [
    "IGNORE",
    "REFUSE",
    "Bool",
    "Bound",
    "Bytes",
    "Int",
    "List",
    "Map",
    "OneOf",
    "Schema",
    "SchemaError",
    "Str",
    "Tuple",
    "bounds",
    "validate",
]

REFUSE = "refuse"  # unknown map keys are an error
IGNORE = "ignore"  # unknown map keys are dropped


class SchemaError(ValueError):
    """``value`` at ``path`` (e.g. ``"shards[3].id"``) does not fit its schema: ``why``."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path or '<root>'}: {why}")
        self.path = path
        self.why = why

    def under(self, segment: str) -> SchemaError:
        """The same error seen from the container that holds the value at ``segment``
        (a key, or ``"[i]"``)."""
        if not self.path:
            path = segment
        elif self.path.startswith("["):
            path = segment + self.path
        else:
            path = f"{segment}.{self.path}"
        return SchemaError(path, self.why)


def _kind(value: object) -> str:
    return type(value).__name__


HEAD = 9  # the longest CBOR head: initial byte + 8-byte argument


class Bound(NamedTuple):
    """The most a value fitting a schema can take on the wire: CBOR bytes and data items."""

    size: int
    items: int


class Schema(abc.ABC):
    """Base class: subclasses implement ``parse(value)`` and ``bound()``."""

    @abc.abstractmethod
    def parse(self, value: Any) -> Any:
        """The checked (and, with ``into``, typed) value; ``SchemaError`` unless it fits."""

    @abc.abstractmethod
    def bound(self) -> Bound:
        """The largest CBOR encoding of any value that fits (see ``bounds``)."""


class Bytes(Schema):
    """A byte string with ``min <= len <= max``.

    With ``view``, a read-only ``memoryview`` is accepted too: a long byte string sliced
    out of the frame it came in (``wire.cbor.loads_sliced``, for messages whose schema
    ``takes_views``), so the field's readers must take any bytes-like value (shard data:
    ``blocks.erasure.Shard``). Everywhere else only ``bytes`` fits: cbor2 would encode
    a memoryview as an array of integers.
    """

    def __init__(self, min: int = 0, max: int = 1 << 20, *, view: bool = False) -> None:
        self.min, self.max = min, max
        self.view = view

    def parse(self, value: Any) -> bytes | memoryview:
        """``value`` if it is bytes of an allowed length (see the class for views)."""
        if type(value) is memoryview and self.view:
            if not value.readonly or value.format != "B" or value.ndim != 1:
                raise SchemaError("", "expected bytes, got a writable or shaped memoryview")
        elif type(value) is not bytes:
            raise SchemaError("", f"expected bytes, got {_kind(value)}")
        if not self.min <= len(value) <= self.max:
            raise SchemaError("", f"length {len(value)} not in [{self.min}, {self.max}]")
        return value

    def bound(self) -> Bound:
        """Head plus ``max`` bytes."""
        return Bound(HEAD + self.max, 1)


class Int(Schema):
    """An integer (``bool`` excluded) with ``min <= value <= max``."""

    def __init__(self, min: int = 0, max: int = 2**64 - 1) -> None:
        self.min, self.max = min, max

    def parse(self, value: Any) -> int:
        """``value`` if it is an int in range."""
        if type(value) is not int:
            raise SchemaError("", f"expected int, got {_kind(value)}")
        if not self.min <= value <= self.max:
            raise SchemaError("", f"{value} not in [{self.min}, {self.max}]")
        return value

    def bound(self) -> Bound:
        """One head."""
        return Bound(HEAD, 1)


class Str(Schema):
    """A text string of ``min <= len <= max`` characters."""

    def __init__(self, max: int = 1024, min: int = 0) -> None:
        self.min, self.max = min, max

    def parse(self, value: Any) -> str:
        """``value`` if it is a str of an allowed length."""
        if type(value) is not str:
            raise SchemaError("", f"expected str, got {_kind(value)}")
        if not self.min <= len(value) <= self.max:
            raise SchemaError("", f"length {len(value)} not in [{self.min}, {self.max}]")
        return value

    def bound(self) -> Bound:
        """Head plus ``max`` characters of up to 4 UTF-8 bytes each."""
        return Bound(HEAD + 4 * self.max, 1)


class Bool(Schema):
    """``True`` or ``False``."""

    def parse(self, value: Any) -> bool:
        """``value`` if it is a bool."""
        if type(value) is not bool:
            raise SchemaError("", f"expected bool, got {_kind(value)}")
        return value

    def bound(self) -> Bound:
        """One head."""
        return Bound(HEAD, 1)


class OneOf(Schema):
    """One of a few literal ``int`` or ``str`` values (of exactly that type)."""

    def __init__(self, *values: int | str) -> None:
        if not values or any(type(v) not in (int, str) for v in values):
            raise ValueError("OneOf takes at least one int or str")
        self.values = frozenset((type(v), v) for v in values)
        self.shown = ", ".join(repr(v) for v in values)

    def parse(self, value: Any) -> int | str:
        """``value`` if it is one of the literals."""
        if type(value) not in (int, str) or (type(value), value) not in self.values:
            shown = repr(value)[:32] if type(value) in (int, str) else _kind(value)
            raise SchemaError("", f"{shown} is not one of {self.shown}")
        return value

    def bound(self) -> Bound:
        """One head plus the longest text literal."""
        text = [4 * len(v) for t, v in self.values if t is str]
        return Bound(HEAD + max(text, default=0), 1)


class List(Schema):
    """A list of ``item`` with ``min_len <= len <= max_len``."""

    def __init__(self, item: Schema, max_len: int, min_len: int = 0) -> None:
        self.item, self.max_len, self.min_len = item, max_len, min_len

    def parse(self, value: Any) -> list:
        """The list of the items' parsed values."""
        if type(value) is not list:
            raise SchemaError("", f"expected list, got {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise SchemaError("", f"{len(value)} items not in [{self.min_len}, {self.max_len}]")
        parse = self.item.parse
        out = []
        for i, v in enumerate(value):
            try:
                out.append(parse(v))
            except SchemaError as exc:
                raise exc.under(f"[{i}]") from None
        return out

    def bound(self) -> Bound:
        """Head plus ``max_len`` items at their bound."""
        item = self.item.bound()
        return Bound(HEAD + self.max_len * item.size, 1 + self.max_len * item.items)


class Tuple(Schema):
    """A fixed-length array whose ``i``-th item fits ``items[i]``; becomes a tuple, or
    ``into(*parts)``. The last *optional* items may be left out (``into`` then gets
    fewer parts)."""

    def __init__(
        self, *items: Schema, into: Callable[..., Any] | None = None, optional: int = 0
    ) -> None:
        self.items = items
        self.into = into
        self.least = len(items) - optional

    def parse(self, value: Any) -> Any:
        """The parts' parsed values, as a tuple or built by ``into``."""
        if type(value) is not list:
            raise SchemaError("", f"expected list, got {_kind(value)}")
        if not self.least <= len(value) <= len(self.items):
            shown = (str(len(self.items)) if self.least == len(self.items)
                     else f"{self.least} to {len(self.items)}")
            raise SchemaError("", f"expected {shown} items, got {len(value)}")
        parts = []
        for i, (schema, v) in enumerate(zip(self.items, value, strict=False)):
            try:
                parts.append(schema.parse(v))
            except SchemaError as exc:
                raise exc.under(f"[{i}]") from None
        return tuple(parts) if self.into is None else self.into(*parts)

    def bound(self) -> Bound:
        """Head plus every item at its bound."""
        size, items = HEAD, 1
        for schema in self.items:
            b = schema.bound()
            size, items = size + b.size, items + b.items
        return Bound(size, items)


class Map(Schema):
    """A dict with all the ``fields`` keys and any of the ``optional`` ones; other keys
    are refused (``extra=REFUSE``) or dropped (``extra=IGNORE``). Becomes a dict of the
    parsed values present, or ``into(that dict)``."""

    def __init__(
        self,
        fields: Mapping[str, Schema],
        optional: Mapping[str, Schema] | None = None,
        *,
        extra: str = REFUSE,
        into: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.fields = dict(fields)
        self.optional = dict(optional or {})
        overlap = self.fields.keys() & self.optional.keys()
        if overlap:
            raise ValueError(f"keys both required and optional: {sorted(overlap)}")
        if extra not in (REFUSE, IGNORE):
            raise ValueError(f"extra must be {REFUSE!r} or {IGNORE!r}")
        self.extra = extra
        self.into = into
        self._all = {**self.fields, **self.optional}

    def parse(self, value: Any) -> Any:
        """The parsed values of the known keys present, as a dict or built by ``into``."""
        if type(value) is not dict:
            raise SchemaError("", f"expected map, got {_kind(value)}")
        known = self._all
        out: dict[str, Any] = {}
        for key, v in value.items():
            schema = known.get(key) if type(key) is str else None
            if schema is None:
                if type(key) is not str:
                    raise SchemaError("", f"map key of type {_kind(key)}")
                if self.extra == REFUSE:
                    raise SchemaError("", f"unknown key {key[:64]!r}")
                continue
            try:
                out[key] = schema.parse(v)
            except SchemaError as exc:
                raise exc.under(key) from None
        if len(out) < len(self._all):  # a required key may be missing (optional ones count)
            for key in self.fields:
                if key not in out:
                    raise SchemaError("", f"missing key {key!r}")
        return out if self.into is None else self.into(out)

    def bound(self) -> Bound:
        """Head plus every key (required and optional) and its value at their bound."""
        size, items = HEAD, 1
        for key, schema in self._all.items():
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


@functools.cache
def takes_views(schema: Schema) -> bool:
    """Does ``schema`` have a ``Bytes(view=True)`` anywhere (see ``Bytes``)?"""
    seen: set[int] = set()
    todo: list[Any] = [schema]
    while todo:
        item = todo.pop()
        if isinstance(item, Bytes) and item.view:
            return True
        if isinstance(item, Schema) and id(item) not in seen:
            seen.add(id(item))
            todo.extend(vars(item).values())
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return False


def validate(schema: Schema, value: Any, path: str = "") -> Any:
    """The checked (or typed, see ``into``) value if ``value`` fits ``schema``; raise
    ``SchemaError(path, why)`` otherwise (``path`` names ``value`` itself)."""
    try:
        return schema.parse(value)
    except SchemaError as exc:
        raise (exc.under(path) if path else exc) from None
