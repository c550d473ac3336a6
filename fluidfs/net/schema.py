"""The message schema language, which lives in fluidfs.wire.schema (one validation style
for the network, metadata and records); re-exported here for the net package's users."""

from fluidfs.wire.schema import (
    Bool,
    Bound,
    Bytes,
    Int,
    List,
    Map,
    OneOf,
    Schema,
    SchemaError,
    Str,
    Tuple,
    bounds,
    validate,
)

__all__ = [
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
