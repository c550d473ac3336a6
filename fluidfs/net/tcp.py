"""TCP glue: dial a peer, serve peers (under admission caps), open an RPC connection."""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import nacl.signing
import trio

from .admission import Admission, Ticket
from .bandwidth import Bandwidth
from .budget import NodeBudget
from .channel import MAX_FRAME, SecureChannel, accept_channel, connect_channel
from .errors import ChannelError, HandshakeError
from .limits import DEFAULT_LIMITS, NetLimits
from .messages import OPS, OpSpec
from .rpc import Dispatcher, RpcConnection

__all__ = ["accept_loop", "accept_peer", "dial", "open_rpc", "serve_tcp"]

log = logging.getLogger(__name__)


async def dial(
    host: str,
    port: int,
    identity: nacl.signing.SigningKey,
    expected_peer: bytes | None = None,
    *,
    timeout: float = 10,
    max_frame: int = MAX_FRAME,
    bandwidth: Bandwidth | None = None,
) -> SecureChannel:
    """Connect over TCP and run the initiator handshake (``timeout`` covers both).

    ``bandwidth``: the node's limits, which the channel's frames then pass.

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
    return await connect_channel(
        stream, identity, expected_peer, timeout=left, max_frame=max_frame, bandwidth=bandwidth
    )


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


# accept() failures that mean "out of a resource, try again soon" (as trio.serve_listeners)
_ACCEPT_BACKOFF = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

#: ``handler(stream, ticket)`` for ``accept_loop``: one admitted inbound connection
Handler = Callable[[trio.SocketStream, Ticket], Awaitable[None]]


async def accept_loop(
    listeners: list[trio.SocketListener], admission: Admission, handler: Handler
) -> None:
    """Accept on every listener forever; ``handler`` runs in a task of its own for each
    connection ``admission.begin`` lets through.

    A refused connection is closed on the spot, with no task and no cancel scope: an
    address over its rate may reconnect thousands of times a second, and
    trio.serve_listeners spent ~100 µs of the event loop on each.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_from, listener.socket, admission, handler, nursery)


async def _accept_from(
    sock: trio.socket.SocketType, admission: Admission, handler: Handler, nursery: trio.Nursery
) -> None:
    while True:
        try:
            conn, addr = await sock.accept()
        except OSError as exc:
            if exc.errno in _ACCEPT_BACKOFF:
                log.warning("accept failed (%s); waiting a moment", exc)
                await trio.sleep(0.1)
                continue
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                continue
            raise
        ip = addr[0] if isinstance(addr, tuple) else "?"
        ticket = admission.begin(ip)
        if ticket is None:
            conn.close()  # the peer sees the connection end before the handshake
            continue
        nursery.start_soon(handler, trio.SocketStream(conn), ticket)


async def accept_peer(
    stream: trio.SocketStream,
    identity: nacl.signing.SigningKey,
    admission: Admission,
    ticket: Ticket,
    bandwidth: Bandwidth | None = None,
) -> SecureChannel | None:
    """Run the responder handshake on a connection ``admission.begin`` gave ``ticket``.

    Returns the channel (the caller passes the ticket to ``admission.admit`` at once), or
    None when the handshake timed out, was dropped to make room or failed (the stream is
    closed; logged at debug level only, since a stranger can cause any number of these).
    """
    ip = ticket.group
    channel = None
    try:
        with ticket.scope:
            if ticket.delay:
                await trio.sleep(ticket.delay)  # this address's turn (admission.py)
            channel = await accept_channel(
                stream,
                identity,
                timeout=admission.limits.handshake_timeout,
                bandwidth=bandwidth,
            )
    except HandshakeError as exc:
        log.debug("inbound handshake from %s failed: %s", ip, exc)
    except Exception:
        log.exception("inbound connection from %s failed", ip)
    finally:
        if channel is None:
            admission.end_handshake(ticket)
            await trio.aclose_forcefully(stream)
    return channel


async def serve_tcp(
    host: str,
    port: int,
    identity: nacl.signing.SigningKey,
    dispatcher: Dispatcher,
    *,
    limits: NetLimits = DEFAULT_LIMITS,
    is_partner: Callable[[bytes], bool] | None = None,
    max_connections: int | None = None,
    ops: Mapping[str, OpSpec] = OPS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept peers on ``host:port`` forever: admission, handshake, ``RpcConnection``.

    ``task_status.started(actual_port)`` reports the bound port (useful with ``port=0``).
    Each connection lives in its own task and every failure in it is contained (logged), so
    one bad client never affects another. ``limits`` apply as in a node's pool
    (``fluidfs.net.admission``, ``fluidfs.net.budget``); ``is_partner`` tells peers with
    an agreement from strangers (None: every peer counts as a partner, for a service
    without agreements); ``max_connections`` overrides ``limits.max_connections``.
    """
    if max_connections is not None:
        limits = dataclasses.replace(
            limits,
            max_connections=max_connections,
            max_strangers=min(limits.max_strangers, max_connections),
        )
    partner = is_partner or (lambda _key: True)
    admission = Admission(limits, partner)
    budget = NodeBudget(limits)

    async def handle(stream: trio.SocketStream, ticket: Ticket) -> None:
        channel = await accept_peer(stream, identity, admission, ticket)
        if channel is None:
            return
        key = channel.peer_key
        conn = RpcConnection(
            channel,
            dispatcher,
            ops=ops,
            limits=limits,
            budget=budget.connection(lambda: partner(key)),
            idle_timeout=limits.idle_timeout,
        )
        admitted = admission.admit(ticket, key, conn)
        if admitted is None:
            await channel.aclose()
            return
        try:
            await conn.run()
        except Exception:
            log.exception("connection handler failed")
        finally:
            admission.leave(admitted)

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await accept_loop(listeners, admission, handle)
