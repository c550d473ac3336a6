"""TCP glue: dial a peer, serve peers (under admission caps), open an RPC connection."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import nacl.signing
import trio

from .admission import Admission, Ticket
from .budget import NodeBudget
from .channel import MAX_FRAME, SecureChannel, accept_channel, connect_channel
from .errors import ChannelError, HandshakeError
from .limits import DEFAULT_LIMITS, NetLimits
from .messages import OPS, OpSpec
from .rpc import Dispatcher, RpcConnection

__all__ = ["accept_peer", "dial", "open_rpc", "serve_tcp"]

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


async def accept_peer(
    stream: trio.SocketStream, identity: nacl.signing.SigningKey, admission: Admission
) -> tuple[SecureChannel, Ticket] | None:
    """Run the responder handshake on an inbound connection under ``admission``'s caps.

    Returns the channel and the ticket to pass to ``admission.admit`` (which the caller
    must do at once), or None when the connection was refused, timed out, was dropped to
    make room or failed its handshake (the stream is closed; logged at debug level only,
    since a stranger can cause any number of these).
    """
    try:
        ip = stream.socket.getpeername()[0]
    except (OSError, IndexError, TypeError):
        ip = "?"
    ticket = admission.begin(ip)
    if ticket is None:
        await trio.aclose_forcefully(stream)
        return None
    channel = None
    try:
        with ticket.scope:
            channel = await accept_channel(
                stream, identity, timeout=admission.limits.handshake_timeout
            )
    except HandshakeError as exc:
        log.debug("inbound handshake from %s failed: %s", ip, exc)
    except Exception:
        log.exception("inbound connection from %s failed", ip)
    finally:
        if channel is None:
            admission.end_handshake(ticket)
            await trio.aclose_forcefully(stream)
    if channel is None:
        return None
    return channel, ticket


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

    async def handle(stream: trio.SocketStream) -> None:
        accepted = await accept_peer(stream, identity, admission)
        if accepted is None:
            return
        channel, ticket = accepted
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
    await trio.serve_listeners(handle, listeners)
