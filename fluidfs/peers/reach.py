"""Reachability: learn where the internet sees this node, and tell peers where to call.

Every ``interval`` seconds the node pings a few peers (partners first). Each ``Ping``
reply says where our connection came from (``seen``, after any NAT). From those
answers, a port mapping the gateway granted (peers/portmap.py) and the listening
address, the node builds the list of addresses it can be reached at, best first:

1. the gateway's mapping (external address and port), if UPnP granted one;
2. an address peers see us at, with our listening port, if it is one of this machine's
   own addresses (a bind to it succeeds): then nothing translates it and the port is
   ours. An address peers see that is not ours means a NAT between us; without a
   mapping nobody outside can dial it, so it is not announced;
3. the listening address itself, if it names a dialable address (not ``0.0.0.0``).

When the list changes (a new DHCP lease, a new mapping, a relay registration gained or
lost: the relay client wakes the check) the node signs a fresh address record
(peers/addrrecord.py; a relay's says it relays) and sends it with a ``Ping`` to its
partners and other known peers (at most ``ANNOUNCE_MAX``); they move its row, and pass
the record on in their ``ShareNewPeers`` answers. The record also goes with every
``Ping`` this loop sends.
When an address we announced stops being ours (the machine moved), every connection is
closed at once: they were bound to the old address and would only time out.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import nacl.signing
import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.address import AddressError, PeerAddr, split_host_port
from fluidfs.peers.addrrecord import (
    MAX_ADDR_TEXT,
    MAX_ADDRS,
    MAX_VIA,
    AddressBook,
    AddressRecord,
    RecordError,
    learn,
    make_record,
    read_record,
)
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.peerlist import PeerList

log = logging.getLogger(__name__)

ANNOUNCE_MAX = 64  # peers told of a new record at once
ANNOUNCE_PARALLEL = 16
PING_TIMEOUT = 5.0


@dataclass
class ReachPolicy:
    """How often to look at what peers see, and how many to ask."""

    interval: float = 60.0
    fanout: int = 3


def is_local_address(host: str) -> bool:
    """True if *host* is an address of this machine (a socket can bind to it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError:
            return False
    return True


@dataclass
class Reachability:
    """Keeps this node's address record true and its peers told."""

    conns: Connections
    peers: PeerList
    ledger: Ledger
    identity: nacl.signing.SigningKey
    policy: ReachPolicy = field(default_factory=ReachPolicy)
    mapped: Callable[[], PeerAddr | None] = lambda: None  # the gateway's mapping, if any
    relays: Callable[[], list[PeerAddr]] = list  # relays we are registered at (relayclient)
    offers_relay: bool = False  # we relay for others (serve --relay): the record says so
    book: AddressBook | None = None  # peers' records; ours too, for our Ping answers
    record: AddressRecord | None = None
    seen: dict[bytes, str] = field(default_factory=dict)  # peer -> host it sees us at
    announced: int = 0  # records signed (for status and tests)
    direct: list[PeerAddr] | None = None  # where we can be dialled, as of the last check
    _moved_from: int = 0  # time of the record whose addresses we found gone
    _woken: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        """Check and announce until cancelled."""
        while True:
            await self.check()
            with trio.move_on_after(self.policy.interval):
                await self._woken.wait()
            self._woken = trio.Event()

    def wake(self) -> None:
        """Check now rather than at the next interval (our relays changed)."""
        self._woken.set()

    def ping_args(self) -> dict:
        """What every Ping of ours carries: our listening address and record."""
        args: dict = {}
        if self.record is not None:
            args["record"] = self.record.raw
            if self.record.addrs:
                args["addr"] = str(self.record.addrs[0])
        elif self.conns.listen_addr:
            args["addr"] = self.conns.listen_addr
        return args

    async def check(self) -> None:
        """Ask a few peers where they see us; sign and announce a new record if the
        addresses we can be reached at changed."""
        if self.record is not None and self._moved_from != self.record.time and \
                await trio.to_thread.run_sync(self._moved):
            log.info("this machine's address changed: reconnecting to every peer")
            self._moved_from = self.record.time  # once per record, not at every check
            self.seen.clear()
            for key in list(self.conns.conns):
                self.conns.drop(key)
        await self._ask_some()
        addrs = await trio.to_thread.run_sync(self.addresses)
        self.direct = addrs
        via = self.relays()[:MAX_VIA]
        addrs = addrs[:MAX_ADDRS - len(via)]  # a record names three places in all
        if not addrs and not via:
            return
        relay = self.offers_relay and bool(addrs)
        if self.record is not None and list(self.record.addrs) == addrs \
                and list(self.record.via) == via and self.record.relay == relay:
            return
        self.record = make_record(self.identity, addrs, via=via, relay=relay)
        if self.book is not None:
            self.book.offer(self.record)
        self.announced += 1
        log.info("reachable at %s: telling peers",
                 ", ".join([*map(str, addrs), *(f"via relay {a}" for a in via)]))
        await self.announce()

    def _moved(self) -> bool:
        """True if an address we announced as this machine's is no longer one of its own
        (blocking: binds test sockets)."""
        assert self.record is not None
        mapped = self.mapped()
        return any(a != mapped and not is_local_address(a.host) for a in self.record.addrs)

    def _targets(self, count: int) -> list[bytes]:
        partners = [p.key for p in self.peers if self.ledger.live(p.key) is not None]
        others = [p.key for p in self.peers if p.addr and p.key not in set(partners)]
        random.shuffle(partners)
        random.shuffle(others)
        return (partners + others)[:count]

    async def _ask_some(self) -> None:
        async with trio.open_nursery() as nursery:
            for key in self._targets(self.policy.fanout):
                nursery.start_soon(self._ask, key)

    async def _ask(self, key: bytes) -> None:
        try:
            reply = await self.conns.call(key, "Ping", self.ping_args(), timeout=PING_TIMEOUT)
        except PeerUnavailable as exc:
            log.info("reachability ping to %s failed: %s", _short(key), exc)
            self.conns.drop(key)  # it may be bound to an address we no longer have
            return
        except RpcError as exc:
            log.info("ping %s refused: %s", _short(key), exc)
            return
        if "record" in reply and self.book is not None:  # its own, signed: as in a Ping
            with contextlib.suppress(RecordError):
                learn(self.peers, self.book, read_record(reply["record"], expected=key), key)
        try:
            host, _ = split_host_port(reply.get("seen", ""))
        except AddressError:
            return
        self.seen[key] = host
        if len(self.seen) > 4 * self.policy.fanout:
            self.seen.pop(next(iter(self.seen)))

    def addresses(self) -> list[PeerAddr]:
        """Where this node can be reached, best first (blocking: binds test sockets)."""
        out: list[PeerAddr] = []
        mapped = self.mapped()
        if mapped is not None:
            out.append(mapped)
        port = 0
        if self.conns.listen_addr:
            with contextlib.suppress(AddressError):
                _, port = split_host_port(self.conns.listen_addr, bind=True)
        if port:
            votes = Counter(self.seen.values())
            for host, _ in votes.most_common(2):
                if is_local_address(host):
                    with contextlib.suppress(AddressError):
                        out.append(PeerAddr(host, port))
            with contextlib.suppress(AddressError):
                out.append(PeerAddr.parse(self.conns.listen_addr))
        unique: list[PeerAddr] = []
        for addr in out:
            if addr not in unique and len(str(addr)) <= MAX_ADDR_TEXT:
                unique.append(addr)
        return unique[:MAX_ADDRS]

    async def announce(self) -> None:
        """Send our record to partners and other known peers (bounded)."""
        slots = trio.Semaphore(ANNOUNCE_PARALLEL)

        async def tell(key: bytes) -> None:
            async with slots:
                with contextlib.suppress(PeerUnavailable, RpcError):
                    await self.conns.call(key, "Ping", self.ping_args(), timeout=PING_TIMEOUT)

        async with trio.open_nursery() as nursery:
            for key in self._targets(ANNOUNCE_MAX):
                nursery.start_soon(tell, key)


def _short(key: bytes) -> str:
    return encode_peer_id(key)[:12]
