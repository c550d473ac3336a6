"""RPC over a ``SecureChannel``: many calls in flight, concurrent handlers, schema checks.

One ``RpcConnection`` per channel. Its ``run()`` task reads every frame: replies are routed
to the waiting ``call()`` by id, requests (if a dispatcher is given) are validated and run
as handler tasks, at most ``max_handlers`` at a time and holding at most
``max_request_bytes`` of request frames; the reader stops reading while either cap is
reached, so a flooding peer is slowed by TCP back-pressure. The connection is
symmetric: both ends may call and serve on the same channel.

Lifetime (trio style, the connection never outlives a nursery):

    async with open_rpc(host, port, identity, expected_peer) as conn:   # fluidfs.net.tcp
        reply = await conn.call("Ping", {})

    conn = RpcConnection(channel, dispatcher)          # long-lived, e.g. a connection pool
    await nursery.start(conn.run)                      # ... later: await conn.aclose()

    await serve_connection(channel, dispatcher)        # server side: returns at disconnect

Failures never escape ``run()``: a bad frame or an envelope without a usable id drops the
connection; every other bad request gets an error reply and the connection lives on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from . import envelope
from .channel import SecureChannel
from .errors import (
    ChannelClosed,
    ChannelError,
    FrameError,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
)
from .messages import OPS, OpSpec
from .schema import Schema, SchemaError, validate

__all__ = ["Dispatcher", "RpcConnection", "serve_connection"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
MAX_HANDLERS = 64  # concurrent handlers per connection
MAX_REQUEST_BYTES = 64 << 20  # request bytes held by running handlers, per connection


class Dispatcher(Protocol):
    """What ``serve_connection`` needs from the service.

    ``schemas`` maps each served op to the schema of its ``args`` (e.g.
    ``messages.REQUEST_SCHEMAS``). ``handle`` returns the reply map or raises ``RpcError``.
    """

    schemas: Mapping[str, Schema]

    async def handle(self, peer_key: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Serve one validated request from ``peer_key``."""
        ...


class _ByteBudget:
    """Bytes of request frames that may be held by running handlers (one acquirer)."""

    def __init__(self, total: int) -> None:
        self.total = self.free = total
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, n: int) -> int:
        n = min(n, self.total)
        while self.free < n:
            await self._lot.park()
        self.free -= n
        return n

    def release(self, n: int) -> None:
        self.free += n
        self._lot.unpark_all()


class _Waiter:
    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: dict[str, Any] | RpcError | None = None


class RpcConnection:
    """Calls and (optionally) serves RPCs over one channel. Needs ``run()`` running."""

    def __init__(
        self,
        channel: SecureChannel,
        dispatcher: Dispatcher | None = None,
        *,
        ops: Mapping[str, OpSpec] = OPS,
        max_handlers: int = MAX_HANDLERS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.channel = channel
        self.dispatcher = dispatcher
        self.ops = ops
        self._slots = trio.Semaphore(max_handlers)
        self._budget = _ByteBudget(max_request_bytes)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Waiter] = {}
        self._dead: str | None = None
        self._started = False
        self._scope: trio.CancelScope | None = None

    @property
    def peer_key(self) -> bytes:
        """The peer's proven Ed25519 identity (32 bytes)."""
        return self.channel.peer_key

    @property
    def closed(self) -> bool:
        """True once the connection has ended; further calls fail at once."""
        return self._dead is not None

    # -- lifetime --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and dispatch until the connection ends, then fail pending calls and close.

        Returns normally whatever the peer does; only cancellation propagates.
        """
        if self._started:
            raise RuntimeError("RpcConnection.run() called twice")
        self._started = True
        reason = "connection closed"
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                task_status.started()
                if self._dead is None:
                    reason = await self._read_loop(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._shutdown(reason)
            with trio.CancelScope(shield=True):
                await self.channel.aclose()

    async def aclose(self) -> None:
        """End the connection: pending calls fail with ``RpcConnectionLost``."""
        self._shutdown("connection closed locally")
        await self.channel.aclose()

    def _shutdown(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        if self._scope is not None:
            self._scope.cancel()
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.result = RpcConnectionLost(self._dead)
            waiter.event.set()

    async def _read_loop(self, nursery: trio.Nursery) -> str:
        channel = self.channel
        while True:
            try:
                frame = await channel.receive()
            except ChannelClosed as exc:
                return str(exc)
            except FrameError as exc:
                log.warning("dropping connection from %s: %s", _hex(self.peer_key), exc)
                return str(exc)
            except (ChannelError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                return str(exc) or "connection closed"
            try:
                msg = envelope.decode(frame)
            except envelope.EnvelopeError as exc:
                if exc.id is None:
                    log.warning("dropping connection from %s: %s", _hex(self.peer_key), exc)
                    return f"protocol violation by peer: {exc.why}"
                await self._reply(envelope.encode_err(exc.id, exc.code, exc.why))
                continue
            size = len(frame)
            del frame
            if isinstance(msg, envelope.Request):
                await self._slots.acquire()
                held = await self._budget.acquire(size)
                nursery.start_soon(self._serve_one, msg, held)
            else:
                self._route_reply(msg)

    # -- client side -----------------------------------------------------------------------

    async def call(
        self, op: str, args: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Call ``op`` on the peer and return its ``ok`` map.

        ``args`` is checked against the op's request schema first (``SchemaError`` for a
        bug of ours); the reply against its response schema (``RpcError("bad_reply")``).
        Ops missing from ``ops`` get only envelope checks. Raises ``RpcError`` with the
        peer's code, ``RpcTimeout`` after ``timeout`` seconds (covering the send too) and
        ``RpcConnectionLost`` if the connection is or becomes dead.
        """
        if self._dead is not None:
            raise RpcConnectionLost(self._dead)
        spec = self.ops.get(op)
        if spec is not None:
            validate(spec.request, args, "args")
        rid = next(self._ids)
        data = envelope.encode_request(rid, op, args)
        if len(data) > self.channel.max_message:
            raise RpcError("too_large", f"{op} request of {len(data)} bytes exceeds one frame")
        waiter = self._pending[rid] = _Waiter()
        try:
            with trio.move_on_after(timeout):
                await self._send_request(data)
                await waiter.event.wait()
        finally:
            self._pending.pop(rid, None)
        result = waiter.result
        if result is None:
            raise RpcTimeout(f"{op}: no reply within {timeout} s")
        if isinstance(result, RpcError):
            raise result
        if spec is not None:
            try:
                validate(spec.response, result, "ok")
            except SchemaError as exc:
                raise RpcError("bad_reply", f"{op}: {exc}") from None
        return result

    async def _send_request(self, data: bytes) -> None:
        try:
            await self.channel.send(data)
        except (ChannelError, trio.ClosedResourceError) as exc:
            self._shutdown(f"send failed: {exc}")
            raise RpcConnectionLost(self._dead or "") from None
        except BaseException:
            # cancelled mid-frame: the outgoing stream is unusable, so end the connection
            if self.channel.send_broken:
                self._shutdown("a send was interrupted")
            raise

    def _route_reply(self, msg: envelope.Response) -> None:
        waiter = self._pending.pop(msg.id, None)
        if waiter is None:
            log.debug("reply %d from %s matches no pending call", msg.id, _hex(self.peer_key))
            return
        waiter.result = msg.ok if msg.err is None else RpcError(*msg.err)
        waiter.event.set()

    # -- server side -----------------------------------------------------------------------

    async def _serve_one(self, req: envelope.Request, held: int) -> None:
        try:
            await self._reply(await self._dispatch(req))
        finally:
            self._budget.release(held)
            self._slots.release()

    async def _dispatch(self, req: envelope.Request) -> bytes:
        dispatcher = self.dispatcher
        schema = None if dispatcher is None else dispatcher.schemas.get(req.op)
        if dispatcher is None or schema is None:
            return envelope.encode_err(req.id, "unknown_op", f"unknown op {req.op[:64]!r}")
        try:
            validate(schema, req.args, "args")
        except SchemaError as exc:
            return envelope.encode_err(req.id, "bad_request", str(exc))
        try:
            result = await dispatcher.handle(self.peer_key, req.op, req.args)
            if type(result) is not dict:
                raise TypeError(f"handler returned {type(result).__name__}, not dict")
            spec = self.ops.get(req.op)
            if spec is not None:
                validate(spec.response, result, "ok")
            data = envelope.encode_ok(req.id, result)
            if len(data) > self.channel.max_message:
                raise ValueError(f"reply of {len(data)} bytes exceeds one frame")
            return data
        except RpcError as exc:
            return envelope.encode_err(req.id, exc.code, str(exc.msg))
        except Exception:
            log.exception("handler for %s from %s failed", req.op, _hex(self.peer_key))
            return envelope.encode_err(req.id, "internal", "internal error")

    async def _reply(self, data: bytes) -> None:
        # if the connection is gone, the read loop notices and cleans up
        with contextlib.suppress(ChannelError, trio.ClosedResourceError):
            await self.channel.send(data)


async def serve_connection(
    channel: SecureChannel,
    dispatcher: Dispatcher,
    *,
    max_handlers: int = MAX_HANDLERS,
    ops: Mapping[str, OpSpec] = OPS,
) -> None:
    """Serve RPCs from the peer on ``channel`` until it disconnects; closes the channel.

    Handler replies are checked against ``ops`` response schemas (a failing reply becomes
    an ``internal`` error and a log line). Never raises because of anything the peer sends
    (only cancellation propagates).
    """
    await RpcConnection(channel, dispatcher, ops=ops, max_handlers=max_handlers).run()


def _hex(key: bytes) -> str:
    return key.hex()[:16]
