"""Keeping registrations at relays, and taking the calls they pass on (``--relay-via``).

A node that cannot be dialled (behind a NAT without UPnP) registers at one or two relays
(peers/relay.py) and renews each registration well before it runs out; the connection it
keeps to the relay is the one the relay uses to say someone is calling
(``RelayIncoming`` with a token). We then open a stream to the relay, send ACCEPT with
the token (net/relaywire.py) and, once the relay says ok, run the responder side of the
handshake on it like on any inbound connection (``Connections.accept_relayed``).

Only relays we registered at may send ``RelayIncoming`` (anyone else gets ``refused``),
and at most ``max_callbacks`` relayed connections (from the call-back until the
connection ends) run at once (then ``busy``): a relay cannot make us open streams
without end. The relays we hold registrations at are announced in our
address record (peers/reach.py) as the ``via`` list.

Given no relays (``--relay-via``), a node learns them from its peers: relays say so in
their signed address records (version 3, peers/addrrecord.py), which discovery passes
around and looks for while we need a relay (peers/discovery.py). While its reachability
check finds no address anyone can dial (``unreachable``), the node asks known peers
whose record says they relay, then other known peers, most trusted first
(``relay_candidates``), to register it until two have, renews those, and lets them
lapse once it can be dialled again. A relay that vanishes (a renewal fails) is dropped
at once and another one asked; one that refused or failed is asked again only after
``retry_refused``. Each change of the relays we hold is told to ``on_change`` (the
reachability check re-signs our record).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from fluidfs.keys import parse_peer
from fluidfs.net.errors import NetError, RpcError
from fluidfs.net.relaywire import STATUS_LEN, RelayError, Status, make_accept, parse_status
from fluidfs.net.streamio import ExactReader, StreamEOF
from fluidfs.peers.address import AddressError, PeerAddr
from fluidfs.peers.addrrecord import AddressBook
from fluidfs.peers.connections import Connections, PeerUnavailable, split_addr
from fluidfs.peers.peerlist import PeerList

log = logging.getLogger(__name__)

MAX_RELAYS = 2  # registrations kept at once (an address record names at most two)


def relay_candidates(peers: PeerList, book: AddressBook) -> list[tuple[bytes, str]]:
    """Where a node nobody can dial asks to register, best first, with the address we
    dial each at: known peers whose newest address record says they relay, most
    trusted first, then the other known peers with an address, most trusted first (a
    relay that has not learnt its own public address yet has no record to say so; one
    that does not relay answers ``unknown_op``)."""
    ranked = []
    for peer in peers:
        if not peer.addr:
            continue
        record = book.get(peer.key)
        announced = record is not None and record.relay
        ranked.append((not announced, -peer.trust, peer.key, peer.addr))
    ranked.sort(key=lambda r: r[:2])
    return [(key, addr) for _, _, key, addr in ranked]


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class RelayClientPolicy:
    """Where to keep registrations and how."""

    relays: tuple[str, ...] = ()  # [PEERID@]HOST:PORT of relays (--relay-via), best first
    max_callbacks: int = 8  # relayed connections at once (call-back to connection end)
    callback_timeout: float = 10.0  # seconds to open a stream back and hear ok
    learn: bool = True  # with no relays given: find some among peers when undialable
    learn_interval: float = 5.0  # seconds between looks at reachability and renewals
    retry_refused: float = 600.0  # a peer that would not relay for us is asked again after


class RelayClient:
    """This node's registrations at relays."""

    def __init__(
        self,
        conns: Connections,
        policy: RelayClientPolicy,
        *,
        unreachable: Callable[[], bool] = lambda: False,
        candidates: Callable[[], list[tuple[bytes, str]]] = list,
        on_change: Callable[[], None] = _nothing,
    ) -> None:
        """*unreachable*: True when our reachability check found no address anyone can
        dial; *candidates*: known relays with an address, (key, HOST:PORT), best first
        (``relay_candidates``); *on_change*: told when the relays we hold change."""
        self.conns = conns
        self.policy = policy
        self.unreachable = unreachable
        self.candidates = candidates
        self.on_change = on_change
        self._at: dict[bytes, tuple[str, float]] = {}  # relay key → (address, expires)
        self._refused: dict[bytes, float] = {}  # peer → when it last would not relay
        self._callbacks = 0
        self._nursery: trio.Nursery | None = None

    def wants_relays(self) -> bool:
        """True while this node learns relays and holds fewer than it may: nobody can
        dial it and no relay was given (discovery then looks for relays)."""
        return (not self.policy.relays and self.policy.learn and self.unreachable()
                and len(self._at) < MAX_RELAYS)

    def via(self) -> list[PeerAddr]:
        """The relays we are registered at now (for our address record), best first."""
        now = trio.current_time()
        order = {parse_peer(e).addr: i for i, e in enumerate(self.policy.relays)}  # learnt: last
        live = sorted((addr for addr, until in self._at.values() if until > now),
                      key=lambda a: order.get(a, len(order)))
        out = []
        for text in live[:MAX_RELAYS]:
            try:
                out.append(PeerAddr.parse(text))
            except AddressError:
                continue
        return out

    async def run(self) -> None:
        """Register at each configured relay and renew at a third of what it grants; with
        none configured, learn relays among peers while nobody can dial us."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for addr in self.policy.relays[:MAX_RELAYS]:
                nursery.start_soon(self._keep, addr)
            if not self.policy.relays and self.policy.learn:
                nursery.start_soon(self._learn)

    async def _learn(self) -> None:
        renew_at: dict[bytes, float] = {}
        while True:
            now = trio.current_time()
            lapsed = [k for k, (_, until) in self._at.items() if until <= now]
            for key in lapsed:
                del self._at[key]  # not renewed (we can be dialled again)
            if lapsed:
                self.on_change()
            if self.unreachable():
                for key, (addr, _) in list(self._at.items()):
                    if now >= renew_at.get(key, 0.0):
                        with_ttl = await self._register_learnt(key, addr)
                        if with_ttl:
                            renew_at[key] = now + with_ttl / 3
                await self._find_more(renew_at)
            await trio.sleep(self.policy.learn_interval)

    async def _find_more(self, renew_at: dict[bytes, float]) -> None:
        now = trio.current_time()
        for key, addr in self.candidates():
            if len(self._at) >= MAX_RELAYS:
                return
            refused = self._refused.get(key)
            if key in self._at or (refused is not None
                                   and now < refused + self.policy.retry_refused):
                continue
            ttl = await self._register_learnt(key, addr)
            if ttl:
                renew_at[key] = now + ttl / 3
                log.info("relay learnt: peers can reach this node through %s", addr)
                self.on_change()

    async def _register_learnt(self, key: bytes, addr: str) -> int:
        """RelayRegister at a known peer; the seconds granted, or 0 (it will not, or
        cannot be reached: asked again after ``retry_refused``)."""
        try:
            reply = await self.conns.call(key, "RelayRegister", {}, timeout=10)
        except (PeerUnavailable, RpcError, NetError) as exc:
            log.info("relay at %s does not register us: %s", addr, exc)
            if self._at.pop(key, None) is not None:  # a relay we held vanished
                self.on_change()
            self._refused[key] = trio.current_time()
            if len(self._refused) > 4096:  # bounded by the peer table, but be sure
                self._refused.pop(next(iter(self._refused)))
            return 0
        self._at[key] = (addr, trio.current_time() + reply["ttl"])
        return reply["ttl"]

    async def _keep(self, addr: str) -> None:
        retry = 5.0
        while True:
            try:
                ttl = await self.register(addr)
            except (PeerUnavailable, RpcError, NetError) as exc:
                log.info("could not register at relay %s: %s", addr, exc)
                await trio.sleep(retry)
                retry = min(retry * 2, 300.0)
                continue
            retry = 5.0
            await trio.sleep(max(1.0, ttl / 3))

    async def register(self, entry: str) -> int:
        """Register (or renew) at the relay *entry* names (``[PEERID@]HOST:PORT``: with
        an id, only a node proving it is taken for the relay); the seconds it granted."""
        relay = parse_peer(entry)
        addr = relay.addr
        key = next((k for k, (a, _) in self._at.items() if a == addr), None)
        if key is None or key not in self.conns.conns or self.conns.conns[key].closed:
            key = (await self.conns.connect(addr, expected=relay.key)).peer_key
        reply = await self.conns.call(key, "RelayRegister", {})
        ttl = reply["ttl"]
        self._at[key] = (addr, trio.current_time() + ttl)
        log.debug("registered at relay %s for %d s", addr, ttl)
        return ttl

    # -- the RelayIncoming op --------------------------------------------------------------

    async def incoming(self, relay: bytes, args: dict[str, Any]) -> dict[str, Any]:
        """The ``RelayIncoming`` op: a relay we are registered at passes on a call."""
        held = self._at.get(relay)
        if held is None:
            raise RpcError("refused", "not registered at you")
        if self._callbacks >= self.policy.max_callbacks or self._nursery is None:
            raise RpcError("busy", "too many relayed calls at once")
        self._callbacks += 1
        self._nursery.start_soon(self._call_back, held[0], args["token"])
        return {}

    async def _call_back(self, addr: str, token: bytes) -> None:
        stream = None
        try:
            host, port = split_addr(addr)
            with trio.fail_after(self.policy.callback_timeout):
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(make_accept(token))
                status = parse_status(await ExactReader(stream).read_exactly(STATUS_LEN))
            if status != Status.OK:
                raise RelayError(f"relay answered {status.name.lower()}")
            relay_ip = stream.socket.getpeername()[0]
            await self.conns.accept_relayed(stream, relay_ip)
            stream = None
        except (trio.TooSlowError, StreamEOF, RelayError, AddressError, OSError,
                trio.BrokenResourceError) as exc:
            log.debug("relayed call through %s failed: %s", addr, exc)
        finally:
            self._callbacks -= 1
            if stream is not None:
                await trio.aclose_forcefully(stream)
