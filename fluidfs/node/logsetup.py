"""Logging of a node process: one line per event, rate-limited per cause, rotated on disk.

A stranger can make a node log: every failed handshake, every malformed request is a
line. So that nobody can fill the disk or drown the lines that matter, every handler
gets ``RateLimit``: per cause (logger, level and message template, i.e. the format
string before its arguments are filled in) at most ``LINES_PER_WINDOW`` lines per
``WINDOW`` seconds; the rest are counted, and the next line of that cause after the
window says how many were left out. A node in the background writes its log through
``RotatingLog`` (``fluidfs.log``, then ``.1`` … ``.3``, ``MAX_BYTES`` each), which
also points the process's stdout and stderr at the current file, so that a traceback
printed at a crash lands there too.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
import time
from pathlib import Path

WINDOW = 60.0
LINES_PER_WINDOW = 20
MAX_CAUSES = 1024  # causes tracked at once; the stalest go first
MAX_BYTES = 8 << 20
BACKUPS = 3
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RateLimit(logging.Filter):
    """At most *lines* records per cause per *window* seconds (see the module docstring)."""

    def __init__(
        self, lines: int = LINES_PER_WINDOW, window: float = WINDOW, clock=time.monotonic
    ) -> None:
        super().__init__()
        self.lines = lines
        self.window = window
        self.clock = clock
        # cause -> [window start, lines let through in it, lines suppressed in it]
        self._causes: dict[tuple[str, int, str], list] = {}
        self._lock = threading.Lock()  # worker threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            return self._admit(record)

    def _admit(self, record: logging.LogRecord) -> bool:
        cause = (record.name, record.levelno, str(record.msg)[:200])
        now = self.clock()
        state = self._causes.get(cause)
        if state is None:
            if len(self._causes) >= MAX_CAUSES:
                self._forget_stale(now)
            self._causes[cause] = [now, 1, 0]
            return True
        start, passed, suppressed = state
        if now - start >= self.window:
            state[:] = [now, 1, 0]
            if suppressed:
                record.msg = (
                    f"{record.getMessage()} [{suppressed} similar lines suppressed in "
                    f"{now - start:.0f} s]"
                )
                record.args = None
            return True
        if passed < self.lines:
            state[1] += 1
            return True
        state[2] += 1
        return False

    def _forget_stale(self, now: float) -> None:
        stale = [c for c, s in self._causes.items() if now - s[0] >= self.window and not s[2]]
        for cause in stale:
            del self._causes[cause]
        if len(self._causes) >= MAX_CAUSES:  # a flood of distinct causes: start afresh
            self._causes.clear()


class RotatingLog(logging.handlers.RotatingFileHandler):
    """A rotating log file that also receives the process's stdout and stderr."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._redirect()

    def doRollover(self) -> None:
        super().doRollover()
        self._redirect()

    def _redirect(self) -> None:
        if self.stream is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        fd = self.stream.fileno()
        os.dup2(fd, 1)
        os.dup2(fd, 2)


def configure(
    log_file: Path | None = None, *, level: int = logging.INFO, max_bytes: int = MAX_BYTES
) -> logging.Handler:
    """Send the process's log to *log_file* (rotated) or to stderr, rate-limited per cause."""
    handler: logging.Handler
    if log_file is not None:
        handler = RotatingLog(log_file, max_bytes)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
