"""Importing pyfuse3 without ``importlib.metadata`` (issue 16: a fresh mount's start).

pyfuse3 3.x sets its ``__version__`` at import by asking ``importlib.metadata``, which
loads ``email``, ``zipfile``, ``csv`` and ``importlib.resources`` and then scans every
``sys.path`` entry for pyfuse3's METADATA file and parses it: about 20 ms of CPU warm,
and some 30 files read from a cold disk, before a fresh machine's tree can show.
Nothing in fluidfs reads ``pyfuse3.__version__``.

``import_pyfuse3`` imports pyfuse3 with a stand-in ``importlib.metadata`` in
``sys.modules`` for the duration of that import only; its ``version`` says "not found",
so pyfuse3 takes its own fallback (``__version__ = 'unknown'``). Afterwards the stand-in
is gone: any later ``import importlib.metadata`` loads the real module.
"""

from __future__ import annotations

import sys
import types

_METADATA = "importlib.metadata"


class _NotFound(ModuleNotFoundError):
    """The stand-in's PackageNotFoundError (a ModuleNotFoundError, as the real one)."""


def _no_version(name: str) -> str:
    raise _NotFound(name)


def import_pyfuse3() -> types.ModuleType:
    """pyfuse3, imported (once) without loading ``importlib.metadata``.

    To be called before anything else imports pyfuse3, from a process's single thread
    (sys.modules is briefly changed); if pyfuse3 or the real ``importlib.metadata`` is
    already loaded, this is a plain import."""
    if "pyfuse3" in sys.modules or _METADATA in sys.modules:
        import pyfuse3

        return pyfuse3
    stand_in = types.ModuleType(_METADATA)
    stand_in.PackageNotFoundError = _NotFound  # type: ignore[attr-defined]
    stand_in.version = _no_version  # type: ignore[attr-defined]
    sys.modules[_METADATA] = stand_in
    try:
        import pyfuse3
    finally:
        if sys.modules.get(_METADATA) is stand_in:
            del sys.modules[_METADATA]
    return pyfuse3
