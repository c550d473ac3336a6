"""What every command shares: exit codes, the one-line failure, the state directory."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fluidfs.statedir import StateDir, default_data_dir

EXIT_FAIL = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """Print one line to stderr and exit."""
    print(f"fluidfs: {message}", file=sys.stderr)
    sys.exit(code)


def state_dir(args: argparse.Namespace) -> StateDir:
    """The state directory named by ``--state-dir``, or the default one."""
    return StateDir((args.state_dir or default_data_dir()).expanduser())


def counted(n: int, noun: str) -> str:
    """'1 snapshot', '3 snapshots'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
