"""Whether the user said the keyfile is saved somewhere safe (the "never exported" warning).

``<state>/keyfile-saved`` (format version 1): one line, the UTC time in seconds at which
the user confirmed it, written by the web page's "I have saved it", by a download of the
keyfile from the page, or by ``fluidfs key export`` (into the keyfile's own state
directory only). While it is missing, status warns that the keyfile was never exported:
losing this machine would lose the backup with it. Deleting it brings the warning back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

NAME = "keyfile-saved"


def saved_at(state: Path) -> float | None:
    """When the keyfile was confirmed saved, or None if it never was."""
    try:
        return float((state / NAME).read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def mark_saved(state: Path) -> float:
    """Record that the keyfile is saved now (atomically); return the time recorded."""
    now = time.time()
    tmp = state / f".{NAME}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{now:.3f}\n")
    os.replace(tmp, state / NAME)
    return now
