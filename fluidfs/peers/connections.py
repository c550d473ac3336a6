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
"""

from __future__ import annotations

import contextlib
import logging
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
from fluidfs.net.channel import SecureChannel
from fluidfs.net.errors import ChannelError, HandshakeError, NetError, RpcConnectionLost, RpcError
from fluidfs.net.limits import DEFAULT_LIMITS, NetLimits
from fluidfs.net.rpc import Dispatcher, RpcConnection
from fluidfs.net.tcp import accept_loop, accept_peer, dial
from fluidfs.peers.address import AddressError, PeerAddr, format_host_port, split_host_port
from fluidfs.peers.peerlist import PeerList

log = logging.getLogger(__name__)

DIAL_TIMEOUT = 5.0
BACKOFF_SECONDS = 2.0
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
    ) -> None:
        self.identity = identity
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
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

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
        channel = await accept_peer(
            stream, self.identity, self.admission, ticket, bandwidth=self.bandwidth
        )
        if channel is None:
            return
        conn = self._new_conn(channel)
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
        conn = self._new_conn(channel)
        assert self._nursery is not None, "Connections.run() is not running"
        await self._nursery.start(self._run_conn, conn)
        self._adopt(conn, addr)
        self.remote[conn.peer_key] = addr
        with contextlib.suppress(AddressError):
            self._dialled[conn] = str(PeerAddr.parse(addr))
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

    def drop(self, key: bytes) -> None:
        """Stop using the connection to the peer and close it (its next call dials afresh):
        for a connection that stopped answering, e.g. after this machine's address
        changed. One that brought a reply within ``ANSWERED_WITHIN`` seconds is kept: it
        is slow (a busy uplink), not dead."""
        conn = self.conns.get(key)
        if conn is None:
            return
        answered = self._answered.get(conn)
        if answered is not None and time.monotonic() - answered < ANSWERED_WITHIN:
            log.info("kept the connection to %s: it answered %.1f s ago",
                     encode_peer_id(key)[:12], time.monotonic() - answered)
            return
        del self.conns[key]
        conn.close_soon("dropped: the peer stopped answering on it")

    def backing_off(self, key: bytes) -> bool:
        """True while a failed dial to the peer is still fresh (no live connection)."""
        conn = self.conns.get(key)
        if conn is not None and not conn.closed:
            return False
        return self._down_until.get(key, 0) > time.monotonic()

    async def get(self, key: bytes) -> RpcConnection:
        """A live connection to the peer, dialling its last known address if needed.

        A connection we dialled to an address the peer has since left (its row moved:
        a newer address record) is closed and the new address dialled: the old one is
        bound to an address nobody answers at any more.
        """
        conn = self.conns.get(key)
        if conn is not None and not conn.closed:
            if not self._left(key, conn):
                return conn
            del self.conns[key]
            assert self._nursery is not None
            self._nursery.start_soon(conn.aclose)
        if self._down_until.get(key, 0) > time.monotonic():
            raise PeerUnavailable(f"peer {encode_peer_id(key)[:12]} is unreachable (backing off)")
        lock = self._dialling.setdefault(key, trio.Lock())
        async with lock:
            conn = self.conns.get(key)
            if conn is not None and not conn.closed:
                return conn
            peer = self.peers.get(key)
            if peer is None or not peer.addr:
                raise PeerUnavailable(f"no address for peer {encode_peer_id(key)[:12]}")
            try:
                return await self.connect(peer.addr, expected=key)
            except PeerUnavailable:
                self._down_until[key] = time.monotonic() + BACKOFF_SECONDS
                raise

    async def call(
        self,
        key: bytes,
        op: str,
        args: dict[str, Any],
        *,
        timeout: float = 30.0,
        priority: int = SERVE,
    ) -> dict[str, Any]:
        """Call *op* on the peer; network failures become PeerUnavailable, replies RpcError.

        *priority* is the request's turn under the upload limit (net/bandwidth.py).

        If the peer closed the connection as we used it (its idle timeout), the call is
        made once more on a new connection: a peer closing an idle connection has not
        read what we sent on it, and every op may be repeated.
        """
        for attempt in (1, 2):
            conn = await self.get(key)
            try:
                reply = await conn.call(op, args, timeout=timeout, priority=priority)
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
