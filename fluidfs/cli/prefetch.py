"""Reading a mount's node modules from disk ahead of its imports (issue 16).

On a machine that has just started (a fresh machine restoring its backup, or any
first mount after boot), the node process imports some 260 modules it finds on a cold
disk: each a small file read on its own, about a millisecond each, one after another
while the interpreter waits. `fluidfs mount`'s own process has nothing to do meanwhile
but wait for the node to say it is ready, so it asks the kernel to read those files
into the page cache first (``posix_fadvise(WILLNEED)``, which queues the reads and
returns), and the node finds most of them there when it imports them.

The files are found by package, not module by module, without importing anything:
fluidfs's own compiled modules (not the web page's, which loads after the tree shows),
the third-party packages the node imports (``PACKAGES``) and the standard-library
modules it imports beyond those the command itself has loaded (``STDLIB``). A module
added later and missing here is only read when imported, as before; with a warm page
cache the whole pass costs a few milliseconds of system time.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Third-party packages and modules the node imports, in about the order it does.
PACKAGES = (
    "trio", "attr", "attrs", "outcome", "sniffio", "sortedcontainers", "idna",
    "pyfuse3", "lmdb", "pyeclib", "pyeclib_c", "zfec",
)
# Standard-library modules the node imports and `fluidfs mount` has not.
STDLIB = (
    "ssl", "_ssl", "ctypes", "_ctypes", "json", "_json", "logging.handlers", "pickle",
    "_pickle", "_compat_pickle", "queue", "_queue", "platform", "tempfile",
    "unicodedata", "stringprep", "heapq", "_heapq", "contextvars", "_contextvars",
    "resource",
)
SKIP_DIRS = {"tests", "_tests", "web"}


def _compiled(directory: Path) -> Iterator[Path]:
    """Every module file under *directory* an import may read: this interpreter's
    compiled ``.pyc`` files and extension modules, not tests."""
    tag = f".{sys.implementation.cache_tag}.pyc"
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith((tag, ".so")) or ".so." in name:
                yield Path(root, name)


def _files_of(name: str) -> Iterator[Path]:
    """The files of top-level module or package *name*, found without importing it
    (a dotted name: its parent is already loaded, or it is not looked for)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None:
        return
    if spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield from _compiled(Path(location))
            libs = Path(f"{location}.libs")  # auditwheel's bundled shared libraries
            if libs.is_dir():
                yield from _compiled(libs)
    else:
        for path in (spec.cached, spec.origin):
            if path and os.path.isabs(path):
                yield Path(path)


def node_files() -> Iterator[Path]:
    """The files the node process imports, those most likely read first first."""
    for name in PACKAGES[:7]:  # trio and what it imports come first
        yield from _files_of(name)
    for name in STDLIB:
        if name not in sys.modules and (
            "." not in name or name.rpartition(".")[0] in sys.modules
        ):
            yield from _files_of(name)
    yield from _compiled(Path(__file__).resolve().parent.parent)
    for name in PACKAGES[7:]:
        yield from _files_of(name)


def read_ahead(files: Iterator[Path]) -> int:
    """Ask the kernel to read *files* into the page cache; return how many it was
    asked for. Never raises: a file that cannot be opened is skipped."""
    asked = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            asked += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return asked
