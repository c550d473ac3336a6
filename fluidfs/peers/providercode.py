"""A storage provider's one-time invitation codes (docs/federation.md, "Joining by
invitation").

Format version 1::

    "ffp1-" || lowercase base32 (RFC 4648, no padding) of
        secret (16 bytes) || provider id (32 bytes) || "HOST:PORT" (UTF-8, at most 255)

The operator's ``fluidfs provider invite --quota SIZE`` draws the secret, keeps only its
hash at the provider (store/accounts.py, table ``invites``, with the quota and an expiry)
and prints the code. The customer's ``fluidfs provider join CODE`` dials HOST:PORT
requiring the node there to prove the provider id in the handshake, so nobody else at
that address ever sees the secret, and sends it (``RedeemInvite``): the provider admits
the caller and forgets the invitation in one transaction. A mistyped code fails to parse,
names an id no node at the address proves, or carries a secret the provider does not
know (refused). Whitespace in a pasted code is ignored; letters may be of either case.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluidfs.peers import codetext
from fluidfs.peers.address import AddressError, split_host_port
from fluidfs.store.accounts import INVITE_SECRET

PREFIX = "ffp1-"
KEY = 32
MAX_ADDR = 255
MAX_CODE = len(PREFIX) + -(-(INVITE_SECRET + KEY + MAX_ADDR) * 8 // 5)


class CodeError(ValueError):
    """Text that is not a provider's invitation code."""


@dataclass(frozen=True)
class ProviderCode:
    """What an invitation code carries: the secret, and the provider to present it to."""

    secret: bytes
    provider: bytes  # its public key
    addr: str  # HOST:PORT where it answers

    def __str__(self) -> str:
        return codetext.encode(PREFIX, self.secret + self.provider + self.addr.encode())


def make_code(secret: bytes, provider: bytes, addr: str) -> ProviderCode:
    """The code for *secret* at *provider* (its key) reached at *addr*; ``CodeError`` if
    *addr* is not a dialable HOST:PORT."""
    code = ProviderCode(secret, provider, addr)
    return read_code(str(code))  # one check for both directions


def read_code(text: str) -> ProviderCode:
    """The contents of an invitation code; ``CodeError`` says why it is not one."""
    raw = codetext.decode(text, PREFIX, MAX_CODE, "a provider's invitation code", CodeError)
    secret, provider = raw[:INVITE_SECRET], raw[INVITE_SECRET : INVITE_SECRET + KEY]
    addr_bytes = raw[INVITE_SECRET + KEY :]
    try:
        addr = addr_bytes.decode()
        if not addr or len(addr_bytes) > MAX_ADDR:
            raise AddressError(f"an address of 1 to {MAX_ADDR} bytes is needed")
        split_host_port(addr)
    except (UnicodeDecodeError, AddressError) as exc:
        raise CodeError(f"not a provider's invitation code (mistyped?): {exc}") from None
    return ProviderCode(secret, provider, addr)
