"""The commands that only ask a running node something start without the node stack.

`fluidfs status`, `peers`, `sync` and `snapshots` each run in a fresh process, often many
times a minute (scripts and the tests poll them); they talk to the node over its control
socket (control.py) and need neither trio nor the network, FUSE or storage modules.
Loading those cost about 0.2 s of CPU per call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ["trio", "pyfuse3", "lmdb", "zfec", "fluidfs.net", "fluidfs.node.node"]

PROBE = """
import json, sys
from fluidfs.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


@pytest.mark.parametrize("command", [["status"], ["peers"], ["sync"], ["snapshots"]])
def test_a_query_command_loads_no_node_stack(tmp_path: Path, command: list[str]) -> None:
    state = tmp_path / "state"  # no node runs here: the command fails, as it should
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *command, "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert "no fluidfs node is running" in result.stderr, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [], result.stdout
