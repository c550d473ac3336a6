"""Connections to peers: one RPC connection per peer, used both ways, opened on demand.

Inbound connections (a peer dialled us) are registered too, so we call the peer
back on the connection it opened instead of dialling a second one. A peer that
could not be reached is not dialled again for a short back-off, so reads and
uploads skip it quickly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import nacl.signing
import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.channel import accept_channel
from fluidfs.net.errors import ChannelError, HandshakeError, NetError, RpcError
from fluidfs.net.rpc import Dispatcher, RpcConnection
from fluidfs.net.tcp import dial
from fluidfs.peers.peerlist import PeerList

log = logging.getLogger(__name__)

DIAL_TIMEOUT = 5.0
BACKOFF_SECONDS = 2.0


class PeerUnavailable(Exception):
    """The peer cannot be reached (or answered with a failure)."""


def split_addr(addr: str) -> tuple[str, int]:
    """'host:port' → (host, port); raise ValueError on anything else."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"not a HOST:PORT address: {addr!r}")
    return host.strip("[]"), int(port)


class Connections:
    """The node's connections to its peers."""

    def __init__(
        self, identity: nacl.signing.SigningKey, dispatcher: Dispatcher, peers: PeerList
    ) -> None:
        self.identity = identity
        self.dispatcher = dispatcher
        self.peers = peers
        self.conns: dict[bytes, RpcConnection] = {}
        self._dialling: dict[bytes, trio.Lock] = {}
        self._down_until: dict[bytes, float] = {}
        self._nursery: trio.Nursery | None = None
        self.listen_addr = ""

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
        """Accept peers on host:port; report the bound port through task_status."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        task_status.started(bound)
        await trio.serve_listeners(self._accept, listeners)

    async def _accept(self, stream: trio.SocketStream) -> None:
        try:
            channel = await accept_channel(stream, self.identity, timeout=DIAL_TIMEOUT)
        except (HandshakeError, ChannelError) as exc:
            log.info("inbound handshake failed: %s", exc)
            await trio.aclose_forcefully(stream)
            return
        except Exception:
            log.exception("inbound connection failed")
            await trio.aclose_forcefully(stream)
            return
        conn = RpcConnection(channel, self.dispatcher)
        self._adopt(conn)
        await self._run_conn(conn)

    # --- outbound ------------------------------------------------------------------------

    async def connect(self, addr: str, expected: bytes | None = None) -> RpcConnection:
        """Dial *addr*, prove identities, and keep the connection."""
        host, port = split_addr(addr)
        try:
            channel = await dial(host, port, self.identity, expected, timeout=DIAL_TIMEOUT)
        except HandshakeError as exc:
            raise PeerUnavailable(f"{addr}: {exc}") from None
        except (ChannelError, OSError) as exc:
            raise PeerUnavailable(f"{addr}: {exc}") from None
        conn = RpcConnection(channel, self.dispatcher)
        assert self._nursery is not None, "Connections.run() is not running"
        await self._nursery.start(self._run_conn, conn)
        self._adopt(conn, addr)
        return conn

    def backing_off(self, key: bytes) -> bool:
        """True while a failed dial to the peer is still fresh (no live connection)."""
        conn = self.conns.get(key)
        if conn is not None and not conn.closed:
            return False
        return self._down_until.get(key, 0) > time.monotonic()

    async def get(self, key: bytes) -> RpcConnection:
        """A live connection to the peer, dialling its last known address if needed."""
        conn = self.conns.get(key)
        if conn is not None and not conn.closed:
            return conn
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
        self, key: bytes, op: str, args: dict[str, Any], *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Call *op* on the peer; network failures become PeerUnavailable, replies RpcError."""
        conn = await self.get(key)
        try:
            reply = await conn.call(op, args, timeout=timeout)
            self.peers.seen(key)
            return reply
        except RpcError as exc:
            if exc.code in ("timeout", "connection_lost"):
                raise PeerUnavailable(f"peer {encode_peer_id(key)[:12]}: {exc}") from None
            raise
        except NetError as exc:
            raise PeerUnavailable(f"peer {encode_peer_id(key)[:12]}: {exc}") from None

    async def aclose(self) -> None:
        """Close every connection."""
        for conn in list(self.conns.values()):
            await conn.aclose()
