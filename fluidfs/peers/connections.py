"""Connections to peers: one RPC connection per peer, used both ways, opened on demand.

Inbound connections (a peer dialled us) are registered too, so we call the peer
back on the connection it opened instead of dialling a second one. A peer that
could not be reached is not dialled again for a short back-off, so reads and
uploads skip it quickly.

Inbound connections pass ``fluidfs.net.admission`` (caps per address, per identity and
in all, with room kept for partners: peers with an active agreement, as ``is_partner``
says), and every connection draws on one node-wide memory budget
(``fluidfs.net.budget``). Connections idle for ``limits.idle_timeout`` are closed by
either end; ``get`` then dials again, and a call that meets a connection the peer has
just closed is retried once on a new one.

A partner whose side of our agreement is held by its storage provider (``store_at``,
docs/federation.md) is reached there for the shard ops and for our records it keeps
(root pointer, lease): ``call`` sends them to the provider with ``for: PARTNER``, so
audits, reads and records of that partner are answered while it is offline, and their
outcomes count for the partner as before. A delegated shard op
(``delegation``, a provider repairing for its customer) goes to the holder itself.

Relays (peers/relay.py): a peer with no address that works is dialled through the relays
its address record names (``via_of``), after its own address; on a node that relays,
the first byte of an inbound stream tells a relay preamble from a HELLO.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

import nacl.signing
import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.admission import Admission, Ticket
from fluidfs.net.bandwidth import SERVE, Bandwidth
from fluidfs.net.budget import NodeBudget
from fluidfs.net.channel import SecureChannel, connect_channel
from fluidfs.net.errors import ChannelError, HandshakeError, NetError, RpcConnectionLost, RpcError
from fluidfs.net.limits import DEFAULT_LIMITS, NetLimits
from fluidfs.net.relaywire import (
    FIRST_BYTE,
    STATUS_LEN,
    RelayError,
    Status,
    make_connect,
    parse_status,
)
from fluidfs.net.rpc import Dispatcher, RpcConnection
from fluidfs.net.streamio import ExactReader, StreamEOF
from fluidfs.net.tcp import accept_loop, accept_peer, dial
from fluidfs.peers.address import AddressError, PeerAddr, format_host_port, split_host_port
from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.relay import RelayServer, read_preamble

log = logging.getLogger(__name__)

SHARD_OPS = frozenset({"StoreShard", "RetrieveShard", "DeleteShard", "AuditShard"})
# What a partner's provider answers for it: its shards and the records we keep with it.
ROUTED_OPS = SHARD_OPS | {"PutRecord", "GetRecord"}
DIAL_TIMEOUT = 5.0
BACKOFF_SECONDS = 2.0
RELAY_CALLBACK_WAIT = 10.0  # a relay gives the peer this long to call back (peers/relay.py)
# A connection that answered a call this recently has not stopped answering: on a thin
# uplink a small call waits seconds behind the shards queued before it, and dropping
# the connection for that would throw away every shard in flight on it.
ANSWERED_WITHIN = 5.0


class PeerUnavailable(Exception):
    """The peer cannot be reached (or answered with a failure)."""


def split_addr(addr: str) -> tuple[str, int]:
    """'host:port' → (host, port); raise ``AddressError`` (a ValueError) on anything else.

    Lenient enough for a listening address (port 0, ``0.0.0.0``); addresses that come
    from peers are parsed strictly with ``PeerAddr.parse`` where they arrive.
    """
    return split_host_port(addr, bind=True)


class Connections:
    """The node's connections to its peers."""

    def __init__(
        self,
        identity: nacl.signing.SigningKey,
        dispatcher: Dispatcher,
        peers: PeerList,
        *,
        limits: NetLimits = DEFAULT_LIMITS,
        is_partner: Callable[[bytes], bool] = lambda _key: False,
        bandwidth: Bandwidth | None = None,
        store_at: Callable[[bytes], tuple[bytes, str] | None] = lambda _key: None,
        relay: RelayServer | None = None,
        via_of: Callable[[bytes], list[str]] = lambda _key: [],
    ) -> None:
        self.identity = identity
        self.store_at = store_at  # partner -> (provider id, address) holding its side
        self.relay = relay  # set when this node relays for others (serve --relay)
        self.via_of = via_of  # the relays a peer said it can be reached through
        # every frame to and from peers passes it: limits, priorities, byte counts
        self.bandwidth = bandwidth if bandwidth is not None else Bandwidth()
        self.dispatcher = dispatcher
        self.peers = peers
        self.limits = limits
        self.is_partner = is_partner
        self.admission = Admission(limits, is_partner)
        self.budget = NodeBudget(limits)
        self.conns: dict[bytes, RpcConnection] = {}
        self._dialling: dict[bytes, trio.Lock] = {}
        self._down_until: dict[bytes, float] = {}
        self._nursery: trio.Nursery | None = None
        self.listen_addr = ""
        # where each peer's latest connection comes from, as we see it (after any NAT)
        self.remote: dict[bytes, str] = {}
        self._dialled: weakref.WeakKeyDictionary[RpcConnection, str] = (
            weakref.WeakKeyDictionary())  # the address each outbound connection went to
        self._answered: weakref.WeakKeyDictionary[RpcConnection, float] = (
            weakref.WeakKeyDictionary())  # when each connection last brought a reply

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery that connection tasks live in (until cancelled)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _adopt(self, conn: RpcConnection, addr: str = "") -> None:
        key = conn.peer_key
        old = self.conns.get(key)
        if old is None or old.closed:
            self.conns[key] = conn
        self._down_until.pop(key, None)
        self.peers.seen(key, addr)

    async def _run_conn(self, conn: RpcConnection, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await conn.run(task_status=task_status)
        finally:
            if self.conns.get(conn.peer_key) is conn:
                del self.conns[conn.peer_key]

    # --- inbound -------------------------------------------------------------------------

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept peers on host:port; report the bound port through task_status.

        From then on ``listen_addr`` is where peers reach us (host and the bound port).
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        self.listen_addr = format_host_port(host, bound)
        task_status.started(bound)
        await accept_loop(listeners, self.admission, self._accept)

    def _new_conn(self, channel: SecureChannel) -> RpcConnection:
        key = channel.peer_key
        return RpcConnection(
            channel,
            self.dispatcher,
            limits=self.limits,
            budget=self.budget.connection(lambda: self.is_partner(key)),
            idle_timeout=self.limits.idle_timeout,
        )

    async def _accept(self, stream: trio.SocketStream, ticket: Ticket) -> None:
        if self.relay is not None and not await self._hello_first(stream, ticket):
            return
        await self._accept_channel(stream, ticket, relayed=False)

    async def _hello_first(self, stream: trio.SocketStream, ticket: Ticket) -> bool:
        """On a relay's port: True if the stream starts a handshake; a relay preamble is
        read here (under the handshake's caps and deadline) and served (False)."""
        preamble = None
        first = b""
        try:
            # ticket.scope is the handshake's (one use only); its deadline bounds us too
            with trio.move_on_at(ticket.scope.deadline):
                if ticket.delay:
                    await trio.sleep(ticket.delay)  # this address's turn (admission.py)
                    ticket.delay = 0.0
                first = await stream.socket.recv(1, socket.MSG_PEEK)
                if first == FIRST_BYTE:
                    preamble = await read_preamble(stream)
        except (RelayError, OSError, trio.BrokenResourceError) as exc:
            log.debug("relay preamble failed: %s", exc)
        if first and first != FIRST_BYTE:
            return True  # a HELLO: the handshake reads it
        self.admission.end_handshake(ticket)
        if preamble is None:
            await trio.aclose_forcefully(stream)
            return False
        assert self.relay is not None
        await self.relay.serve(stream, preamble)
        return False

    async def accept_relayed(self, stream: trio.abc.Stream, relay_ip: str) -> None:
        """Run the responder side on a stream a relay spliced to a dialler, then serve the
        connection as any inbound one (counted under the relay's address by admission)."""
        ticket = self.admission.begin(relay_ip)
        if ticket is None:
            await trio.aclose_forcefully(stream)
            return
        await self._accept_channel(stream, ticket, relayed=True)

    async def _accept_channel(self, stream: trio.abc.Stream, ticket: Ticket,
                              *, relayed: bool) -> None:
        channel = await accept_peer(
            stream, self.identity, self.admission, ticket, bandwidth=self.bandwidth
        )
        if channel is None:
            return
        conn = self._new_conn(channel)
        if not relayed:  # a relayed peer's address is not the relay's
            self._note_remote(channel.peer_key, stream)
        admitted = self.admission.admit(ticket, channel.peer_key, conn)
        if admitted is None:
            await channel.aclose()
            return
        try:
            self._adopt(conn)
            await self._run_conn(conn)
        finally:
            self.admission.leave(admitted)

    # --- outbound ------------------------------------------------------------------------

    async def connect(self, addr: str, expected: bytes | None = None) -> RpcConnection:
        """Dial *addr*, prove identities, and keep the connection."""
        host, port = split_addr(addr)
        try:
            channel = await dial(
                host, port, self.identity, expected, timeout=DIAL_TIMEOUT, bandwidth=self.bandwidth
            )
        except HandshakeError as exc:
            raise PeerUnavailable(f"{addr}: {exc}") from None
        except (ChannelError, OSError) as exc:
            raise PeerUnavailable(f"{addr}: {exc}") from None
        conn = await self._keep(self._new_conn(channel), addr)
        self._adopt(conn, addr)
        self.remote[conn.peer_key] = addr
        with contextlib.suppress(AddressError):
            self._dialled[conn] = str(PeerAddr.parse(addr))
        return conn

    async def connect_via(self, relay_addr: str, key: bytes) -> RpcConnection:
        """Reach peer *key* through the relay at *relay_addr* and keep the connection.

        The handshake runs end to end with the peer and pins *key*: the relay only
        carries ciphertext and cannot answer as the peer.
        """
        host, port = split_addr(relay_addr)
        where = f"{encode_peer_id(key)[:12]} via {relay_addr}"
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(DIAL_TIMEOUT + RELAY_CALLBACK_WAIT):
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(make_connect(key))
                status = parse_status(await ExactReader(stream).read_exactly(STATUS_LEN))
            if status != Status.OK:
                raise RelayError(f"the relay answered {status.name.lower()}")
            channel = await connect_channel(
                stream, self.identity, key, timeout=DIAL_TIMEOUT, bandwidth=self.bandwidth
            )
        except (trio.TooSlowError, StreamEOF, RelayError, HandshakeError, ChannelError,
                OSError, trio.BrokenResourceError) as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise PeerUnavailable(f"{where}: {exc or 'timed out'}") from None
        conn = await self._keep(self._new_conn(channel), where)
        self._adopt(conn)
        return conn

    async def _keep(self, conn: RpcConnection, where: str) -> RpcConnection:
        """Run *conn* in the connections' nursery; PeerUnavailable once that has ended.

        A node that is stopping (``run`` over, or its nursery closing after a part
        failed) may still dial: unmounting gives the writer lease back last. That dial
        is a peer we cannot reach, not an error that would hide the first one."""
        try:
            if self._nursery is None:
                raise RuntimeError("Connections.run() is not running")
            await self._nursery.start(self._run_conn, conn)
        except RuntimeError as exc:
            await conn.aclose()
            raise PeerUnavailable(f"{where}: {exc}") from None
        return conn

    def _left(self, key: bytes, conn: RpcConnection) -> bool:
        """True if *conn* went to an address other than the one the peer's row names."""
        dialled = self._dialled.get(conn)
        peer = self.peers.get(key)
        return bool(dialled and peer is not None and peer.addr and peer.addr != dialled)

    def _note_remote(self, key: bytes, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
        except (OSError, ValueError):
            return
        self.remote[key] = format_host_port(host, port)
        if len(self.remote) > 2 * self.limits.max_connections:
            self.remote = {k: v for k, v in self.remote.items() if k in self.conns}

    def drop(self, key: bytes, *, even_if_answering: bool = False) -> None:
        """Stop using the connection to the peer and close it (its next call dials afresh):
        for a connection that stopped answering, e.g. after this machine's address
        changed. One that brought a reply within ``ANSWERED_WITHIN`` seconds is kept: it
        is slow (a busy uplink), not dead — unless *even_if_answering*."""
        conn = self.conns.get(key)
        if conn is None:
            return
        answered = self._answered.get(conn)
        recent = answered is not None and time.monotonic() - answered < ANSWERED_WITHIN
        if recent and not even_if_answering:
            log.info("kept the connection to %s: it answered %.1f s ago",
                     encode_peer_id(key)[:12], time.monotonic() - answered)
            return
        del self.conns[key]
        conn.close_soon("dropped: the peer stopped answering on it")

    def backing_off(self, key: bytes) -> bool:
        """True while a failed dial to the peer is still fresh (no live connection); for a
        partner held at a provider, the provider's dial."""
        where = self.store_at(key)
        if where is not None:
            key = where[0]
        conn = self.conns.get(key)
        if conn is not None and not conn.closed:
            return False
        return self._down_until.get(key, 0) > time.monotonic()

    async def get(self, key: bytes, addr: str = "", *, backoff: bool = True) -> RpcConnection:
        """A live connection to the peer, dialling *addr* or its last known address.

        A connection we dialled to an address the peer has since left (its row moved:
        a newer address record) is closed and the new address dialled: the old one is
        bound to an address nobody answers at any more. Without *backoff* the peer is
        dialled even if it failed just now, and a failure does not make others skip it
        (the mount gate's dialer, which retries on its own schedule).
        """
        conn = self.conns.get(key)
        if conn is not None and not conn.closed:
            if not self._left(key, conn):
                return conn
            del self.conns[key]
            assert self._nursery is not None
            self._nursery.start_soon(conn.aclose)
        if backoff and self._down_until.get(key, 0) > time.monotonic():
            raise PeerUnavailable(f"peer {encode_peer_id(key)[:12]} is unreachable (backing off)")
        lock = self._dialling.setdefault(key, trio.Lock())
        async with lock:
            conn = self.conns.get(key)
            if conn is not None and not conn.closed:
                return conn
            try:
                return await self._dial_known(key, addr)
            except PeerUnavailable:
                if backoff:
                    self._down_until[key] = time.monotonic() + BACKOFF_SECONDS
                raise

    async def _dial_known(self, key: bytes, addr: str = "") -> RpcConnection:
        """Dial *addr* or the peer's address first; if that fails (or there is none), the
        relays it announced, in its order."""
        peer = self.peers.get(key)
        relays = self.via_of(key)
        addr = addr or (peer.addr if peer is not None else "")
        if not addr and not relays:
            raise PeerUnavailable(f"no address for peer {encode_peer_id(key)[:12]}")
        failure = None
        if addr:
            try:
                return await self.connect(addr, expected=key)
            except PeerUnavailable as exc:
                failure = exc
        for relay_addr in relays:
            try:
                return await self.connect_via(relay_addr, key)
            except PeerUnavailable as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def call(
        self,
        key: bytes,
        op: str,
        args: dict[str, Any],
        *,
        timeout: float = 30.0,
        priority: int = SERVE,
        addr: str = "",
        tail: bytes | bytearray | memoryview | None = None,
    ) -> dict[str, Any]:
        """Call *op* on the peer; network failures become PeerUnavailable, replies RpcError.

        *priority* is the request's turn under the upload limit (net/bandwidth.py);
        *addr*: where to dial the peer if there is no connection (else its row's address);
        *tail*: the bytes of ``envelope.TAIL`` in *args*, sent without a copy (rpc.py).

        If the peer closed the connection as we used it (its idle timeout), the call is
        made once more on a new connection: a peer closing an idle connection has not
        read what we sent on it, and every op may be repeated.
        """
        if op in ROUTED_OPS and "for" not in args and "delegation" not in args:
            where = self.store_at(key)
            if where is not None:  # the partner's provider answers for it
                args = {"for": key, **args}  # in front: a TAIL stays the last item
                key, addr = where
        for attempt in (1, 2):
            conn = await self.get(key, addr)
            try:
                reply = await conn.call(op, args, timeout=timeout, priority=priority, tail=tail)
                self._answered[conn] = time.monotonic()
                self.peers.seen(key)
                return reply
            except RpcConnectionLost as exc:
                if attempt == 1 and conn.peer_closed:
                    continue
                raise PeerUnavailable(f"peer {encode_peer_id(key)[:12]}: {exc}") from None
            except RpcError as exc:
                if exc.code in ("timeout", "connection_lost"):
                    raise PeerUnavailable(f"peer {encode_peer_id(key)[:12]}: {exc}") from None
                self._answered[conn] = time.monotonic()  # a refusal is an answer too
                raise
            except NetError as exc:
                raise PeerUnavailable(f"peer {encode_peer_id(key)[:12]}: {exc}") from None
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close every connection."""
        for conn in list(self.conns.values()):
            await conn.aclose()
