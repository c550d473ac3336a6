"""The shape of an op handler: (the caller's proven key, validated args) → reply map.

Each module of the service answers a family of ops and lists them by wire name in an
``ops()`` table; service/host.py merges the tables and dispatches on them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Args = dict[str, Any]
Reply = dict[str, Any]
Op = Callable[[bytes, Args], Awaitable[Reply]]
