"""The authenticated key exchange that opens a secure channel (protocol version 1).

Three messages, all fixed-size, sent raw on the stream (no length prefix)::

    1. initiator -> responder   HELLO_i                        72 bytes
    2. responder -> initiator   HELLO_r || AUTH_r              72 + 88 bytes
    3. initiator -> responder   AUTH_i                         88 bytes

    HELLO (72 bytes)
      0   4  magic  b"FLFS"
      4   1  version (1)
      5   1  role    (1 = initiator, 2 = responder)
      6   2  flags   big-endian; bit 0 (FLAG_AES256GCM): the sender can run AES-256-GCM
                     frames. Other bits are reserved and must be 0.
      8  32  ephemeral X25519 public key (crypto_kx_keypair, fresh per connection)
     40  32  long-term Ed25519 identity public key

    AUTH (88 bytes)
      0  64  Ed25519 signature by the identity key over
             b"fluidfs-auth-v1" || role label || TH || secretstream header
     64  24  secretstream header of the sender's outgoing direction; on an AES channel
             (both HELLOs carry FLAG_AES256GCM) either unused random bytes or
             AEGIS_OFFER = b"fluidfs aegis256 frames\0", the offer of AEGIS-256 frames

    role label  = b"initiator" or b"responder" (the signer's role; stops reflection)
    TH          = BLAKE2b-256(person=b"fluidfs-hs-v1", HELLO_i || HELLO_r)

Session keys: ``crypto_kx_client_session_keys`` (initiator) / ``..._server_...`` (responder)
over the ephemeral keys, each then bound to the transcript:
``key = BLAKE2b-256(key=kx_key, person=b"fluidfs-key-v1", TH)``. Each side initialises
``crypto_secretstream_xchacha20poly1305`` push with its tx key (sending the header in its
AUTH) and pull with its rx key and the peer's header. When both HELLOs carry
FLAG_AES256GCM, frames use AES-256-GCM under the same tx/rx keys instead, and the
secretstream headers are unused (see ``fluidfs.net.framecipher``). The flags are part of
TH, which both sides sign, so nobody in between can take the faster cipher away.

On an AES channel a node that can run AEGIS-256 sends AEGIS_OFFER in place of its
secretstream header; when both AUTHs carry it, frames use AEGIS-256 (frame format 1)
under the same keys instead of AES-256-GCM. A node from before AEGIS sends a real
(random-looking) header and so gets AES-256-GCM. Each header is covered by its sender's
signature, so an offer cannot be removed or forged in transit: a tampered AUTH fails.

The initiator checks the responder's identity (``expected_peer``) and signature before it
signs anything itself. Future versions keep bytes 0..5 of HELLO so that a v1 peer can refuse
them with a clear error.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

from .errors import HandshakeError
from .framecipher import AEGIS_OFFER

MAGIC = b"FLFS"
VERSION = 1
ROLE_INITIATOR = 1
ROLE_RESPONDER = 2
HELLO_LEN = 72
SIG_LEN = 64
HEADER_LEN = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
AUTH_LEN = SIG_LEN + HEADER_LEN  # 88
AUTH_CONTEXT = b"fluidfs-auth-v1"
TH_PERSON = b"fluidfs-hs-v1"
KEY_PERSON = b"fluidfs-key-v1"
LABELS = {ROLE_INITIATOR: b"initiator", ROLE_RESPONDER: b"responder"}
FLAG_AES256GCM = 0x0001
KNOWN_FLAGS = FLAG_AES256GCM

SecretStreamState = sodium.crypto_secretstream_xchacha20poly1305_state


@dataclass(frozen=True)
class Hello:
    """A parsed HELLO message."""

    role: int
    eph_pk: bytes
    identity: bytes
    raw: bytes
    flags: int = 0


def make_hello(role: int, eph_pk: bytes, identity_pk: bytes, flags: int = 0) -> bytes:
    """Encode a HELLO message."""
    return MAGIC + bytes([VERSION, role]) + flags.to_bytes(2, "big") + eph_pk + identity_pk


def parse_hello(raw: bytes, expected_role: int) -> Hello:
    """Parse and check a HELLO; raise ``HandshakeError`` if it is not a v1 hello of that role."""
    if len(raw) != HELLO_LEN or raw[:4] != MAGIC:
        raise HandshakeError("peer is not speaking the fluidfs protocol")
    if raw[4] != VERSION:
        raise HandshakeError(f"unsupported protocol version {raw[4]} (we speak {VERSION})")
    if raw[5] != expected_role:
        raise HandshakeError("peer claims the wrong handshake role")
    flags = int.from_bytes(raw[6:8], "big")
    if flags & ~KNOWN_FLAGS:
        raise HandshakeError(f"unknown handshake flags {flags:#06x}")
    return Hello(role=raw[5], eph_pk=raw[8:40], identity=raw[40:72], raw=raw, flags=flags)


def transcript_hash(hello_i: bytes, hello_r: bytes) -> bytes:
    """TH = BLAKE2b-256 over both hellos, initiator first."""
    return hashlib.blake2b(hello_i + hello_r, digest_size=32, person=TH_PERSON).digest()


def _auth_message(role: int, th: bytes, header: bytes) -> bytes:
    return AUTH_CONTEXT + LABELS[role] + th + header


def make_auth(identity: nacl.signing.SigningKey, role: int, th: bytes, header: bytes) -> bytes:
    """Sign the transcript for ``role`` and return the AUTH message (signature || header)."""
    sig = identity.sign(_auth_message(role, th, header)).signature
    return sig + header


def check_auth(raw: bytes, peer_identity: bytes, peer_role: int, th: bytes) -> bytes:
    """Verify a peer's AUTH message; return its secretstream header."""
    if len(raw) != AUTH_LEN:
        raise HandshakeError("truncated AUTH message")
    sig, header = raw[:SIG_LEN], raw[SIG_LEN:]
    try:
        nacl.signing.VerifyKey(peer_identity).verify(_auth_message(peer_role, th, header), sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise HandshakeError("peer's identity signature is invalid") from exc
    return header


def session_keys(
    role: int, eph_pk: bytes, eph_sk: bytes, peer_eph_pk: bytes, th: bytes
) -> tuple[bytes, bytes]:
    """Return ``(rx, tx)`` keys for ``role``, bound to the transcript hash."""
    try:
        if role == ROLE_INITIATOR:
            rx, tx = sodium.crypto_kx_client_session_keys(eph_pk, eph_sk, peer_eph_pk)
        else:
            rx, tx = sodium.crypto_kx_server_session_keys(eph_pk, eph_sk, peer_eph_pk)
    except nacl.exceptions.CryptoError as exc:
        raise HandshakeError("peer's ephemeral key is invalid") from exc

    def bind(k: bytes) -> bytes:
        return hashlib.blake2b(th, key=k, digest_size=32, person=KEY_PERSON).digest()

    return bind(rx), bind(tx)


@dataclass(frozen=True)
class Side:
    """Our side of a handshake: role, identity, fresh ephemeral keys and the HELLO we send.

    Both roles take the same steps, in an order their role decides: ``start``, send or
    read HELLOs, ``meet`` the peer's HELLO, then exchange and check AUTH messages.
    """

    role: int
    identity: nacl.signing.SigningKey
    flags: int
    eph_pk: bytes
    eph_sk: bytes
    hello: bytes
    aegis: bool = False  # offer AEGIS-256 frames if the channel turns out to be AES

    @classmethod
    def start(
        cls, role: int, identity: nacl.signing.SigningKey, flags: int, aegis: bool = False
    ) -> Side:
        """Make fresh ephemeral keys and our HELLO."""
        eph_pk, eph_sk = sodium.crypto_kx_keypair()
        hello = make_hello(role, eph_pk, identity.verify_key.encode(), flags)
        return cls(role, identity, flags, eph_pk, eph_sk, hello, aegis)

    def meet(self, peer: Hello) -> Session:
        """Both HELLOs are known: the transcript hash and the session keys."""
        if self.role == ROLE_INITIATOR:
            th = transcript_hash(self.hello, peer.raw)
        else:
            th = transcript_hash(peer.raw, self.hello)
        rx, tx = session_keys(self.role, self.eph_pk, self.eph_sk, peer.eph_pk, th)
        push, header = new_push(tx)
        if self.aegis and self.flags & peer.flags & FLAG_AES256GCM:
            header = AEGIS_OFFER  # the secretstream state goes unused on an AES channel
        return Session(self, peer, th, rx, tx, push, header)


@dataclass(frozen=True)
class Session:
    """A handshake past its HELLOs: keys bound to the transcript, AUTH still to exchange."""

    side: Side
    peer: Hello
    th: bytes
    rx: bytes
    tx: bytes
    push: SecretStreamState  # our outgoing secretstream (unused with AES-256-GCM frames)
    header: bytes

    @property
    def flags(self) -> int:
        """The features both HELLOs offered."""
        return self.side.flags & self.peer.flags

    def aegis_agreed(self, peer_header: bytes) -> bool:
        """Do both AUTHs (ours and the peer's, checked) offer AEGIS-256 frames?"""
        return (
            bool(self.flags & FLAG_AES256GCM)
            and self.header == AEGIS_OFFER
            and hmac.compare_digest(peer_header, AEGIS_OFFER)
        )

    def auth(self) -> bytes:
        """Our AUTH message: our identity's signature over the transcript."""
        return make_auth(self.side.identity, self.side.role, self.th, self.header)

    def check_peer_auth(self, raw: bytes) -> bytes:
        """Verify the peer's AUTH message; return its secretstream header."""
        peer_role = ROLE_RESPONDER if self.side.role == ROLE_INITIATOR else ROLE_INITIATOR
        return check_auth(raw, self.peer.identity, peer_role, self.th)


def new_push(tx_key: bytes) -> tuple[SecretStreamState, bytes]:
    """A push (encrypting) secretstream state and its 24-byte header."""
    state = SecretStreamState()
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, tx_key)
    return state, header


def new_pull(rx_key: bytes, header: bytes) -> SecretStreamState:
    """A pull (decrypting) secretstream state for the peer's header."""
    state = SecretStreamState()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, rx_key)
    return state


def same_key(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two public keys."""
    return hmac.compare_digest(a, b)
