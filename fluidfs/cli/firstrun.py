"""What ``mount`` and ``serve`` do first, alike, so a first run on a fresh machine works.

The state directory is created (or checked) and made private; then the keyfile is read,
or, if none was named and none is at the default place, created there, marked new for
this state directory (its first mount there starts a new backup without asking peers:
statedir.py, ``new-key``), with a note to keep a copy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fluidfs import keys as keymod
from fluidfs.cli.common import EXIT_USAGE, fail
from fluidfs.statedir import StateDir, default_keyfile


def check_state_dir(state: StateDir) -> None:
    """Create the state directory if needed; one clear line if it cannot be used."""
    try:
        state.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        fail(f"state directory {state.path} is not a directory", EXIT_USAGE)
    except OSError as exc:
        fail(f"cannot create state directory {state.path}: {exc.strerror}", EXIT_USAGE)
    if not state.path.is_dir():
        fail(f"state directory {state.path} is not a directory", EXIT_USAGE)
    if not os.access(state.path, os.W_OK | os.X_OK):
        fail(f"state directory {state.path} is not writable", EXIT_USAGE)
    if state.foreign():
        fail(f"{state.path} holds state of an unknown format")
    try:
        loose = state.make_private()
    except OSError as exc:
        fail(f"cannot make state directory {state.path} private: {exc.strerror}", EXIT_USAGE)
    if loose is not None:
        print(
            f"fluidfs: warning: state directory {state.path} was mode {loose:04o} "
            "(other users could read it): now 0700",
            file=sys.stderr,
        )


def load_or_create_keyfile(path: Path | None, state: StateDir) -> keymod.KeyRing:
    """Read the keyfile; create one at the default place if none was named or exists.

    A keyfile created here is new for *state*: its first mount there starts a new
    backup without asking peers whether one exists (statedir.py, ``new-key``).
    """
    explicit = path is not None
    path = (path or default_keyfile()).absolute()
    if not path.exists() and not explicit:
        created = keymod.generate()
        keymod.write_keyfile(path, created)
        state.mark_new_key(keymod.KeyRing(created).peer_id)
        print(f"fluidfs: created a new keyfile at {path}", file=sys.stderr)
        print(
            "fluidfs: keep a copy of it somewhere safe: without it the backup cannot be recovered",
            file=sys.stderr,
        )
    try:
        return keymod.KeyRing(keymod.read_keyfile(path))
    except keymod.KeyfileError as exc:
        fail(str(exc))
