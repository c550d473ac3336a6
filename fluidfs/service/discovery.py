"""Discovery and liveness RPCs: who else we know, and that we are here.

``ShareNewPeers`` answers with verified rows only, trusted and long-known first (never the
newest strangers), at most ``SHARE_LIMIT``, each with the newest signed address record we
hold for it (peers/addrrecord.py), so fresh addresses spread. An ``addr`` a caller sends
(with ``Ping`` or ``ProposeAgreement``) is a claim for discovery to check, not an address
we believe; a ``record`` it sends with ``Ping`` must be its own, signed, and newer than
the one we hold, and then moves its row. ``Ping`` answers with ``seen``: the address the
caller's connection comes from, so a node learns what the internet makes of it, and with
our own newest record (a relay's says it relays).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fluidfs.net.errors import RpcError
from fluidfs.peers.address import AddressError, PeerAddr, UnusableAddress, split_host_port
from fluidfs.peers.addrrecord import AddressBook, RecordError, learn, read_record
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.ops import Args, Op, Reply

SHARE_LIMIT = 64


@dataclass
class DiscoveryOps:
    """Answers ShareNewPeers and Ping.

    *addresses*: the newest address record per peer; *remote_of*: the address a peer's
    latest connection comes from ("host:port", "" if unknown).
    """

    peers: PeerList
    addresses: AddressBook = field(default_factory=AddressBook)
    remote_of: Callable[[bytes], str] = lambda _key: ""

    def ops(self) -> dict[str, Op]:
        """The ops served here, by wire name."""
        return {"ShareNewPeers": self.share, "Ping": self.ping}

    async def share(self, peer: bytes, args: Args) -> Reply:
        """Some peers we know and trust, for the caller's discovery."""
        limit = min(args["max"], SHARE_LIMIT)
        self.peers.seen(peer)
        shared = []
        for p in self.peers.referrals(limit, exclude=peer):
            item = {"id": p.key, "addr": p.addr}
            record = self.addresses.get(p.key)
            if record is not None:
                item["record"] = record.raw
            shared.append(item)
        return {"peers": shared}

    async def ping(self, peer: bytes, args: Args) -> Reply:
        """Our clock and where the caller comes from; the caller is seen, with the
        address it claims and its own address record."""
        if "record" in args:
            try:
                record = read_record(args["record"], expected=peer)
            except RecordError as exc:
                raise RpcError("bad_request", f"record: {exc}") from None
            learn(self.peers, self.addresses, record, peer)
        seen = self.remote_of(peer)
        note_claim(self.peers, peer, claimed_addr(args, seen))
        reply: Reply = {"time": int(time.time())}
        if seen:
            reply["seen"] = seen
        own = self.addresses.get(self.peers.self_key)  # put there by peers/reach.py
        if own is not None:
            reply["record"] = own.raw
        return reply


def note_claim(peers: PeerList, peer: bytes, addr: PeerAddr | None) -> None:
    """The connection proved *peer*; where it listens is a claim for discovery to check."""
    if addr is None:
        peers.seen(peer)
    else:
        peers.claim(peer, addr, source=peer)


def claimed_addr(args: Args, seen: str = "") -> PeerAddr | None:
    """The ``addr`` a caller says it listens at: None if absent or undialable; ``bad_request``
    if malformed. A wildcard such as ``0.0.0.0:7470`` (a node listening on every address)
    names only a port: with *seen*, the address the caller's connection comes from, the
    claim is that address at that port (to be verified like any claim), else None."""
    text = args.get("addr", "")
    if not text:
        return None
    try:
        return PeerAddr.parse(text)
    except UnusableAddress:
        return _wildcard_at(text, seen)
    except AddressError as exc:
        raise RpcError("bad_request", f"addr: {exc}") from None


def _wildcard_at(text: str, seen: str) -> PeerAddr | None:
    try:
        host, port = split_host_port(text, bind=True)
        if not seen or not ipaddress.ip_address(host).is_unspecified:
            return None
        return PeerAddr(split_host_port(seen, bind=True)[0], port)
    except (AddressError, ValueError):
        return None
