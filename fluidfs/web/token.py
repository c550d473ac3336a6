"""The web page's secret: ``<state>/web-token`` (0600), and the CSRF token derived from it.

``<state>/web`` holds the running page's base URL (no token); ``read_url`` joins them.

Format version 1: one line, 43 URL-safe base64 characters (32 random bytes). Made on the
first start of a node with the page on and kept across restarts, so a bookmarked login
cookie keeps working; deleting the file makes a new one (and logs every browser out).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

NAME = "web-token"
ADDRESS_FILE = "web"  # the running page's base URL, published by server.py
CSRF_CONTEXT = b"fluidfs web csrf v1"


def load_or_create(state: Path) -> str:
    """The token in *state*, made (0600) if there is none; a looser file is made 0600."""
    path = state / NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(os.stat(path).st_mode) != 0o600:
            os.chmod(path, 0o600)
        token = path.read_text(encoding="ascii").strip()
        if len(token) >= 32:
            return token
        path.unlink()
        return load_or_create(state)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    return token


def csrf_token(token: str) -> str:
    """The CSRF token of a session: a keyed hash of the login token (not the token)."""
    return hmac.new(token.encode(), CSRF_CONTEXT, hashlib.sha256).hexdigest()


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented secret."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def read_url(state: Path) -> str | None:
    """The page's URL with its one-time token, as the running node published it."""
    try:
        base = (state / ADDRESS_FILE).read_text(encoding="ascii").strip()
        token = (state / NAME).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return f"{base}?token={token}" if base else None
