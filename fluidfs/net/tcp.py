"""TCP glue: dial a peer, serve peers, open an RPC connection as a context manager."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import nacl.signing
import trio

from .channel import MAX_FRAME, SecureChannel, accept_channel, connect_channel
from .errors import ChannelError, HandshakeError
from .messages import OPS, OpSpec
from .rpc import MAX_HANDLERS, Dispatcher, RpcConnection, serve_connection

__all__ = ["dial", "open_rpc", "serve_tcp"]

log = logging.getLogger(__name__)


async def dial(
    host: str,
    port: int,
    identity: nacl.signing.SigningKey,
    expected_peer: bytes | None = None,
    *,
    timeout: float = 10,
    max_frame: int = MAX_FRAME,
) -> SecureChannel:
    """Connect over TCP and run the initiator handshake (``timeout`` covers both).

    Raises ``HandshakeError`` for a bad or unexpected peer and ``ChannelError`` if the TCP
    connection cannot be made.
    """
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise ChannelError(f"cannot connect to {host}:{port}: {exc}") from exc
    if scope.cancelled_caught:
        raise ChannelError(f"cannot connect to {host}:{port}: timed out")
    left = max(scope.deadline - trio.current_time(), 0.001)
    return await connect_channel(stream, identity, expected_peer, timeout=left, max_frame=max_frame)


@asynccontextmanager
async def open_rpc(
    host: str,
    port: int,
    identity: nacl.signing.SigningKey,
    expected_peer: bytes | None = None,
    *,
    timeout: float = 10,
    dispatcher: Dispatcher | None = None,
    ops: Mapping[str, OpSpec] = OPS,
) -> AsyncIterator[RpcConnection]:
    """Dial ``host:port`` and yield a running ``RpcConnection``; close it on exit.

    Usage::

        async with open_rpc(host, port, me, expected_peer=peer_id) as conn:
            reply = await conn.call("Ping", {})

    ``dispatcher`` lets the peer call us back on the same connection; ``ops`` are the
    schemas calls and replies are checked against (see ``RpcConnection``). For connections
    that must outlive a block (a pool), use ``dial`` + ``RpcConnection`` +
    ``nursery.start(conn.run)`` instead.
    """
    channel = await dial(host, port, identity, expected_peer, timeout=timeout)
    conn = RpcConnection(channel, dispatcher, ops=ops)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            yield conn
        finally:
            await conn.aclose()


async def serve_tcp(
    host: str,
    port: int,
    identity: nacl.signing.SigningKey,
    dispatcher: Dispatcher,
    *,
    handshake_timeout: float = 10,
    max_connections: int = 1024,
    max_handlers: int = MAX_HANDLERS,
    ops: Mapping[str, OpSpec] = OPS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept peers on ``host:port`` forever: handshake, then ``serve_connection``.

    ``task_status.started(actual_port)`` reports the bound port (useful with ``port=0``).
    Each connection lives in its own task and every failure in it is contained (logged), so
    one bad client never affects another. Connections beyond ``max_connections`` are
    closed at once.
    """
    slots = trio.CapacityLimiter(max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            log.warning("connection limit (%d) reached; refusing a peer", max_connections)
            await trio.aclose_forcefully(stream)
            return
        try:
            try:
                channel = await accept_channel(stream, identity, timeout=handshake_timeout)
            except HandshakeError as exc:
                log.info("handshake failed: %s", exc)
                return
            await serve_connection(channel, dispatcher, max_handlers=max_handlers, ops=ops)
        except Exception:
            log.exception("connection handler failed")
            await trio.aclose_forcefully(stream)
        finally:
            slots.release()

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)
