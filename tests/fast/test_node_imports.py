"""What a mount's node process imports before the tree is visible (issue 16).

A fresh machine's mount reads every module it imports from a cold disk before the
restored tree shows, so the node process loads nothing that mounting does not use
(these modules come in only with the work that needs them, if ever), and `fluidfs
mount` asks the kernel for the files it does load while the node starts
(cli/prefetch.py). Checked in one new interpreter, as `fluidfs mount` runs: the parser,
then the node's imports (this one has imported everything the other tests use).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fluidfs.cli.prefetch import read_ahead

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

NODE_PROCESS = """
import json, sys
from fluidfs.cli.main import build_parser
from fluidfs.cli import mount
build_parser()
before = set(sys.modules)
listed = {str(p) for p in mount.node_files()}
mount.import_node()
loaded = sorted(sys.modules)
files = set()
for name in set(sys.modules) - before:
    spec = getattr(sys.modules[name], "__spec__", None)
    for path in (getattr(spec, "cached", None), getattr(spec, "origin", None)):
        if path and path.endswith((".pyc", ".so")):
            files.add(path)
            break
import pyfuse3, importlib.metadata
print(json.dumps({
    "loaded": loaded,
    "files": len(files),
    "unlisted": sorted(files - listed),
    "fuse_error": pyfuse3.FUSEError(2).errno,
    "trio_version": importlib.metadata.version("trio"),
}))
"""


@pytest.fixture(scope="module")
def node_process() -> dict:
    """What a new interpreter loaded, and could have read ahead, as a mount's node."""
    out = subprocess.run(
        [sys.executable, "-c", NODE_PROCESS], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_the_node_process_imports_only_what_mounting_uses(node_process: dict) -> None:
    loaded = set(node_process["loaded"])
    assert "fluidfs.node.node" in loaded and "pyfuse3" in loaded  # the node did load
    unwanted = {name: why for name, why in NOT_BEFORE_VISIBLE.items() if name in loaded}
    assert unwanted == {}


def test_pyfuse3_works_and_importlib_metadata_is_the_real_one_later(
    node_process: dict,
) -> None:
    """The stand-in that keeps importlib.metadata out of pyfuse3's import
    (fs/fuseimport.py) is gone once pyfuse3 is loaded: a later import of
    importlib.metadata gets the real module."""
    assert node_process["fuse_error"] == 2
    assert node_process["trio_version"][0].isdigit()


def test_the_files_read_ahead_are_the_node_modules_files(node_process: dict) -> None:
    """Nearly every file the node imports is among those `fluidfs mount` reads ahead (a
    module added since and not listed is only read when imported, hence the margin)."""
    imported, unlisted = node_process["files"], node_process["unlisted"]
    assert imported > 200
    assert len(unlisted) <= 0.05 * imported, unlisted


def test_read_ahead_skips_what_it_cannot_open(tmp_path: Path) -> None:
    there = tmp_path / "a.pyc"
    there.write_bytes(b"x" * 10_000)
    assert read_ahead(iter([tmp_path / "missing.pyc", there])) == 1
