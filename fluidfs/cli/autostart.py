"""``fluidfs service install``: start the backup at login (a systemd user unit, unitfile.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluidfs import unitfile
from fluidfs.cli.common import fail

DEFAULT_MOUNTPOINT = Path("~/Backup")


def cmd_service(args: argparse.Namespace) -> None:
    """fluidfs service install [MOUNTPOINT] [--keyfile K] [--state-dir S] [--print]."""
    mountpoint = args.mountpoint or DEFAULT_MOUNTPOINT
    try:
        text = unitfile.installed_text(mountpoint, args.keyfile, args.state_dir)
    except ValueError as exc:
        fail(str(exc))
    if args.print_unit:
        sys.stdout.write(text)
        return
    try:
        path = unitfile.write_unit(text)
    except OSError as exc:
        fail(f"cannot write the unit: {exc}")
    print(f"fluidfs: wrote {path}; to mount {mountpoint} at every login, run")
    print(f"  systemctl --user daemon-reload && systemctl --user enable --now {unitfile.NAME}")
