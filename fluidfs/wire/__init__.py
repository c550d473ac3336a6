"""Typed, bounded CBOR: how everything fluidfs reads from a peer or a disk is checked.

One style for the network (net/messages.py, net/envelope.py), metadata nodes
(fs/metaformat.py) and signed records (peers/rootrecord.py, peers/lease.py): declare
the value's shape as a schema (``schema``: Bytes, Str, Int, Bool, OneOf, List, Tuple,
Map; each bounded), decode with ``cbor.decode(schema, data, max_size=, max_items=)``
(size cap, optional pure-Python prescan of the item count, hardened cbor2, then the
schema), and get typed values out (``into=`` builds the dataclass). A missing or
mistyped field is an error, never a default; unknown map keys are refused unless the
schema says ``extra=IGNORE``. Formats: docs/formats.md.
"""

from fluidfs.wire.cbor import MAX_DEPTH, ScanError, decode, loads, scan
from fluidfs.wire.schema import (
    IGNORE,
    REFUSE,
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
    "IGNORE",
    "MAX_DEPTH",
    "REFUSE",
    "Bool",
    "Bound",
    "Bytes",
    "Int",
    "List",
    "Map",
    "OneOf",
    "ScanError",
    "Schema",
    "SchemaError",
    "Str",
    "Tuple",
    "bounds",
    "decode",
    "loads",
    "scan",
    "validate",
]
