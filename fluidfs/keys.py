"""The keyfile and every key derived from it.

Keyfile format, version 1 (text, one line, mode 0600)::

    fluidfs-key-1:<base64url, no padding, of a CBOR map>

    {"v": 1,                  # format version
     "root": bytes(32),       # the one secret; every key derives from it
     "n": int,                # shards per block (erasure-coding N)
     "k": int,                # shards needed to rebuild a block (K)
     "peers": [str, ...]}     # optional bootstrap peers, see below

Bootstrap peer entries, revision 2: ``PEERID@HOST:PORT``, where PEERID is the peer's
id as printed (``encode_peer_id``): a mount dials HOST:PORT and refuses whoever answers
unless it proves that identity. ``fluidfs key export --with-peers`` writes this form.
Revision 1 entries are plain ``HOST:PORT`` (they pin no identity); they are still read.
The map itself is unchanged, so the format version stays 1 (a fluidfs that predates
revision 2 reads such a keyfile but cannot dial those entries).

Derivations use BLAKE3's key-derivation mode with one context string per
purpose, each carrying its own version, so that a purpose can be re-keyed
without touching the others.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import blake3
import cbor2
import nacl.signing

PREFIX = "fluidfs-key-1:"
FORMAT_VERSION = 1
ROOT_SECRET_BYTES = 32

CONTEXT_IDENTITY = "fluidfs 2026-11 identity signing key v1"
CONTEXT_METADATA = "fluidfs 2026-11 metadata encryption key v1"
CONTEXT_WRAP = "fluidfs 2026-11 block key wrapping key v1"
CONTEXT_DEDUP = "fluidfs 2026-11 block id keyed hash v1"


MAX_PEERS = 64  # bootstrap entries a keyfile may carry
MAX_ENTRY = 300  # characters in one entry (an id is 52, a host name at most 253)


class KeyfileError(Exception):
    """The keyfile is missing, unreadable, malformed or of an unknown version."""


@dataclass(frozen=True)
class BootstrapPeer:
    """One bootstrap entry: an address and, when the entry names it, the peer's identity."""

    addr: str
    key: bytes | None = None

    def __str__(self) -> str:
        return self.addr if self.key is None else f"{encode_peer_id(self.key)}@{self.addr}"


def parse_peer(text: str) -> BootstrapPeer:
    """Parse ``PEERID@HOST:PORT`` or ``HOST:PORT``; raise ValueError saying what is wrong."""
    if type(text) is not str or not 0 < len(text) <= MAX_ENTRY:
        raise ValueError("a peer entry must be PEERID@HOST:PORT or HOST:PORT")
    ident, sep, addr = text.rpartition("@")
    key = decode_peer_id(ident) if sep else None
    host, colon, port = addr.rpartition(":")
    if not colon or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a HOST:PORT address: {addr!r}")
    return BootstrapPeer(addr, key)


@dataclass(frozen=True)
class Keyfile:
    """The contents of a keyfile: the root secret and the erasure-coding settings."""

    root: bytes
    shards_total: int = 12
    shards_needed: int = 8
    peers: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.root) != ROOT_SECRET_BYTES:
            raise KeyfileError("root secret must be 32 bytes")
        check_coding(self.shards_total, self.shards_needed)

    def bootstrap(self) -> list[BootstrapPeer]:
        """The bootstrap entries, parsed (``loads`` has checked every one)."""
        return [parse_peer(p) for p in self.peers]


def check_coding(n: int, k: int) -> None:
    """Raise ValueError unless 1 <= k <= n <= 256 (zfec's limits)."""
    if not (1 <= k <= n <= 256):
        raise ValueError(f"need 1 <= needed ({k}) <= shards ({n}) <= 256")


def generate(shards_total: int = 12, shards_needed: int = 8) -> Keyfile:
    """Make a new keyfile with a fresh random root secret."""
    return Keyfile(os.urandom(ROOT_SECRET_BYTES), shards_total, shards_needed)


def dumps(keyfile: Keyfile) -> str:
    """Serialise a keyfile to its one-line text form."""
    body = cbor2.dumps(
        {
            "v": FORMAT_VERSION,
            "root": keyfile.root,
            "n": keyfile.shards_total,
            "k": keyfile.shards_needed,
            "peers": list(keyfile.peers),
        }
    )
    return PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=") + "\n"


def loads(text: str) -> Keyfile:
    """Parse the text form of a keyfile; raise KeyfileError with a reason if it is bad."""
    text = text.strip()
    if not text.startswith(PREFIX):
        if text.startswith("fluidfs-key-"):
            raise KeyfileError("keyfile is of a newer format version than this fluidfs knows")
        raise KeyfileError("not a fluidfs keyfile (missing 'fluidfs-key-1:' prefix)")
    encoded = text[len(PREFIX) :]
    try:
        body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        data = cbor2.loads(body)
    except (binascii.Error, ValueError, cbor2.CBORDecodeError) as exc:
        raise KeyfileError(f"keyfile is corrupt: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
        raise KeyfileError("keyfile is corrupt: bad header")
    root, n, k, peers = data.get("root"), data.get("n"), data.get("k"), data.get("peers", [])
    if not isinstance(root, bytes) or len(root) != ROOT_SECRET_BYTES:
        raise KeyfileError("keyfile is corrupt: bad root secret")
    if not isinstance(n, int) or not isinstance(k, int):
        raise KeyfileError("keyfile is corrupt: bad shard settings")
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise KeyfileError("keyfile is corrupt: bad peer list")
    if len(peers) > MAX_PEERS:
        raise KeyfileError(f"keyfile is corrupt: more than {MAX_PEERS} peers")
    for entry in peers:
        try:
            parse_peer(entry)
        except ValueError as exc:
            raise KeyfileError(f"keyfile is corrupt: bad peer {entry[:80]!r}: {exc}") from None
    try:
        return Keyfile(root, n, k, tuple(peers))
    except ValueError as exc:
        raise KeyfileError(f"keyfile is corrupt: {exc}") from None


def read_keyfile(path: Path) -> Keyfile:
    """Read and parse the keyfile at *path*."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyfileError(f"no keyfile at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyfileError(f"cannot read keyfile {path}: {exc}") from None
    return loads(text)


def write_keyfile(path: Path, keyfile: Keyfile) -> None:
    """Write *keyfile* to *path* with mode 0600; refuse to overwrite an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, dumps(keyfile).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def with_peers(keyfile: Keyfile, peers: list[str] | list[BootstrapPeer]) -> Keyfile:
    """Return a copy of *keyfile* listing *peers* (entries or their text) for bootstrap."""
    entries = tuple(str(p) for p in peers)
    for entry in entries:
        parse_peer(entry)
    return replace(keyfile, peers=entries[:MAX_PEERS])


def derive(root: bytes, context: str) -> bytes:
    """Derive a 32-byte key for one purpose from the root secret."""
    return blake3.blake3(root, derive_key_context=context).digest()


def encode_peer_id(public_key: bytes) -> str:
    """A peer id as printed: lowercase base32 of the Ed25519 public key, no padding."""
    return base64.b32encode(public_key).decode().rstrip("=").lower()


def decode_peer_id(text: str) -> bytes:
    """Inverse of encode_peer_id; raise ValueError on a malformed id."""
    text = text.strip().upper()
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except binascii.Error:
        raise ValueError(f"not a peer id: {text!r}") from None
    if len(raw) != 32:
        raise ValueError(f"not a peer id: {text!r}")
    return raw


class KeyRing:
    """All keys of one user, derived from the keyfile's root secret."""

    def __init__(self, keyfile: Keyfile) -> None:
        self.keyfile = keyfile
        self.signing_key = nacl.signing.SigningKey(derive(keyfile.root, CONTEXT_IDENTITY))
        self.public_key: bytes = bytes(self.signing_key.verify_key)
        self.peer_id = encode_peer_id(self.public_key)
        self.metadata_key = derive(keyfile.root, CONTEXT_METADATA)
        self.wrap_key = derive(keyfile.root, CONTEXT_WRAP)
        self.dedup_key = derive(keyfile.root, CONTEXT_DEDUP)
