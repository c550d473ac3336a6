"""Discovery and liveness RPCs: who else we know, and that we are here.

``ShareNewPeers`` answers with verified rows only, trusted and long-known first (never the
newest strangers), at most ``SHARE_LIMIT``. An ``addr`` a caller sends (with ``Ping`` or
``ProposeAgreement``) is a claim for discovery to check, not an address we believe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fluidfs.net.errors import RpcError
from fluidfs.peers.address import AddressError, PeerAddr, UnusableAddress
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.ops import Args, Op, Reply

SHARE_LIMIT = 64


@dataclass
class DiscoveryOps:
    """Answers ShareNewPeers and Ping."""

    peers: PeerList

    def ops(self) -> dict[str, Op]:
        """The ops served here, by wire name."""
        return {"ShareNewPeers": self.share, "Ping": self.ping}

    async def share(self, peer: bytes, args: Args) -> Reply:
        """Some peers we know and trust, for the caller's discovery."""
        limit = min(args["max"], SHARE_LIMIT)
        self.peers.seen(peer)
        shared = self.peers.referrals(limit, exclude=peer)
        return {"peers": [{"id": p.key, "addr": p.addr} for p in shared]}

    async def ping(self, peer: bytes, args: Args) -> Reply:
        """Our clock; the caller is seen, with the address it claims."""
        note_claim(self.peers, peer, claimed_addr(args))
        return {"time": int(time.time())}


def note_claim(peers: PeerList, peer: bytes, addr: PeerAddr | None) -> None:
    """The connection proved *peer*; where it listens is a claim for discovery to check."""
    if addr is None:
        peers.seen(peer)
    else:
        peers.claim(peer, addr, source=peer)


def claimed_addr(args: Args) -> PeerAddr | None:
    """The ``addr`` a caller says it listens at: None if absent or undialable (a wildcard
    such as ``0.0.0.0:7470`` is a hint we cannot use, not an error); ``bad_request`` if
    malformed."""
    text = args.get("addr", "")
    if not text:
        return None
    try:
        return PeerAddr.parse(text)
    except UnusableAddress:
        return None
    except AddressError as exc:
        raise RpcError("bad_request", f"addr: {exc}") from None
