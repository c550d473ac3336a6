"""What a mount's node process imports before the tree is visible (issue 16).

A fresh machine's mount reads every module it imports from a cold disk before the
restored tree shows, so the node process loads nothing that mounting does not use:
these modules come in only with the work that needs them, if ever. Checked in a new
interpreter (this one has imported everything the other tests use).
"""

from __future__ import annotations

import subprocess
import sys

# Module: why it used to come in.
NOT_BEFORE_VISIBLE = {
    "importlib.metadata": "pyfuse3 asks it for its own version at import",
    "email": "importlib.metadata parses the version from a METADATA file",
    "zipfile": "importlib.metadata",
    "csv": "importlib.metadata",
    "statistics": "one median in blocks/remote.py",
    "fractions": "statistics",
    "decimal": "statistics, through fractions (_decimal, 1.7 MB)",
    "calendar": "a snapshot-name parser nothing called",
    "datetime": "calendar",
    "zfec": "the erasure code of blocks sealed before layout 4 (and its command line)",
}

LOAD_NODE = """
import sys
from fluidfs.cli.main import build_parser
from fluidfs.cli.mount import import_node
build_parser()
import_node()
print("\\n".join(sorted(sys.modules)))
"""


def test_the_node_process_imports_only_what_mounting_uses() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_NODE], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "fluidfs.node.node" in loaded and "pyfuse3" in loaded  # the node did load
    unwanted = {name: why for name, why in NOT_BEFORE_VISIBLE.items() if name in loaded}
    assert unwanted == {}


def test_pyfuse3_still_works_and_importlib_metadata_is_the_real_one_later() -> None:
    """The stand-in that keeps importlib.metadata out of pyfuse3's import is gone once
    pyfuse3 is loaded: a later import of importlib.metadata gets the real module."""
    code = (
        "from fluidfs.cli.mount import import_node\n"
        "import_node()\n"
        "import pyfuse3, importlib.metadata\n"
        "print(pyfuse3.FUSEError(2).errno, importlib.metadata.version('trio') != '')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["2", "True"]


COVERAGE = """
import sys
from fluidfs.cli.main import build_parser
from fluidfs.cli import mount
build_parser()
before = set(sys.modules)
listed = {str(p) for p in mount.node_files()}
mount.import_node()
files = set()
for name in set(sys.modules) - before:
    spec = getattr(sys.modules[name], "__spec__", None)
    for path in (getattr(spec, "cached", None), getattr(spec, "origin", None)):
        if path and path.endswith((".pyc", ".so")):
            files.add(path)
            break
print(len(files), len(files & listed))
print("\\n".join(sorted(files - listed)))
"""


def test_the_files_read_ahead_are_the_node_modules_files() -> None:
    """`fluidfs mount` asks the kernel for the node's module files while the node
    starts (cli/prefetch.py): nearly every file the node then imports is among them (a
    module added since and not listed is only read when imported, hence the margin)."""
    out = subprocess.run(
        [sys.executable, "-c", COVERAGE], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    imported, listed = map(int, out[0].split())
    assert imported > 200
    assert listed >= 0.95 * imported, out[1:]


def test_read_ahead_skips_what_it_cannot_open(tmp_path) -> None:
    from fluidfs.cli.prefetch import read_ahead

    there = tmp_path / "a.pyc"
    there.write_bytes(b"x" * 10_000)
    assert read_ahead(iter([tmp_path / "missing.pyc", there])) == 1
