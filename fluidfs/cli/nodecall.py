"""Asking the running node over its control socket (fluidfs/control.py)."""

from __future__ import annotations

import argparse

from fluidfs import control
from fluidfs.cli.common import fail, state_dir


def call_node(args: argparse.Namespace, cmd: str, timeout: float = 60.0, **request) -> dict:
    """The node's reply to *cmd*; one line and exit 1 if there is no node or it refused."""
    try:
        return control.call(state_dir(args).control, cmd, timeout=timeout, **request)
    except control.ControlError as exc:
        fail(str(exc))
