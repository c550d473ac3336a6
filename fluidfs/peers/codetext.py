"""The text form shared by invite codes (peers/invite.py) and a provider's invitation
codes (peers/providercode.py): a version prefix, then the payload in lowercase base32
(RFC 4648, no padding). Whitespace in a pasted code is ignored; letters may be of
either case."""

from __future__ import annotations

import base64
import binascii
import re


def encode(prefix: str, raw: bytes) -> str:
    """*raw* as a code starting with *prefix*."""
    return prefix + base64.b32encode(raw).decode().rstrip("=").lower()


def decode(text: str, prefix: str, max_code: int, what: str,
           error: type[ValueError]) -> bytes:
    """The payload of the code *text*; *error* ("not *what*: ...") if it does not start
    with *prefix*, is longer than *max_code* characters or is not base32."""
    code = re.sub(r"\s+", "", text)
    if not code.lower().startswith(prefix):
        raise error(f"not {what}: it should start with {prefix}")
    if len(code) > max_code:
        raise error(f"not {what}: longer than {max_code} characters")
    body = code[len(prefix):].upper()
    try:
        return base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise error(f"not {what}: mistyped (not base32)") from None
