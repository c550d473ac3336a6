"""RPC over a ``SecureChannel``: many calls in flight, concurrent handlers, schema checks.

One ``RpcConnection`` per channel. Its ``run()`` task reads every frame: replies are routed
to the waiting ``call()`` by id, requests (if a dispatcher is given) are validated and run
as handler tasks. The connection is symmetric: both ends may call and serve on the same
channel.

Lifetime (trio style, the connection never outlives a nursery):

    async with open_rpc(host, port, identity, expected_peer) as conn:   # fluidfs.net.tcp
        reply = await conn.call("Ping", {})

    conn = RpcConnection(channel, dispatcher)          # long-lived, e.g. a connection pool
    await nursery.start(conn.run)                      # ... later: await conn.aclose()

    await serve_connection(channel, dispatcher)        # server side: returns at disconnect

What a peer can make us hold is bounded before we hold it (limits: ``NetLimits``, memory:
``fluidfs.net.budget``):

1. From a frame's 4-byte length alone: a frame larger than ``small_frame`` is read only if
   something the peer may send now is that large — a request of an op whose schema allows
   it, from a partner (in v1 only ``StoreShard``), or the reply to one of our pending
   calls whose op allows it (``RetrieveShard``). Anything else ends the connection before
   the body is allocated. The frame's bytes are reserved from the budget before reading
   (the reader waits for room; the peer is slowed by TCP back-pressure), and the body
   must arrive within ``frame_timeout``.
2. ``envelope.peek`` (bounded pure-Python walk, no decoding) reads id and op and counts
   items. A request larger (in bytes or items) than its op's schema allows gets a
   ``too_large`` error reply, an unknown op ``unknown_op`` — neither is decoded. A reply
   larger than its call's op allows fails that call with ``bad_reply``, undecoded.
3. The frame is decoded (in a worker thread from ``decode_offload`` bytes) and its
   decoded size — bytes plus ``item_overhead`` per item — stays reserved while its
   handler runs. Before the handler starts, the op's largest reply is reserved too
   (RetrieveShard: 2 x 8 MiB), shrunk to the real reply once it is encoded, and released
   when it is sent. A reply not sent within ``send_timeout`` ends the connection.
4. At most ``max_handlers`` requests run at once; the reader waits for a slot.
5. With ``idle_timeout``, a connection with no pending calls, no running handlers and no
   frame for that long is closed (our pool dials again when it needs the peer). These
   timeouts are checked by one watcher task per connection (``_watch``).

Failures never escape ``run()``: a bad frame or an envelope without a usable id drops the
connection; every other bad request gets an error reply and the connection lives on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from fluidfs.wire.schema import (
    Bound,
    Int,
    Map,
    Schema,
    SchemaError,
    Str,
    bounds,
    takes_views,
    validate,
)

from . import envelope
from .bandwidth import SERVE, Deadline
from .budget import ConnBudget, Hold, NodeBudget
from .channel import SecureChannel, buffer_cost
from .errors import (
    ChannelClosed,
    ChannelError,
    FrameError,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
)
from .limits import DEFAULT_LIMITS, NetLimits
from .messages import OPS, OpSpec

__all__ = [
    "ERR_BOUND",
    "Dispatcher",
    "RpcConnection",
    "decode_limiter",
    "reply_bound",
    "request_bound",
    "serve_connection",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
MAX_HANDLERS = DEFAULT_LIMITS.max_handlers  # concurrent handlers per connection


def _envelope_bound(fields: dict[str, Schema]) -> Bound:
    return bounds(Map({"v": Int(), "id": Int(), **fields}))


_EMPTY = bounds(Map({}))
_REQUEST_ENVELOPE = _envelope_bound({"op": Str(envelope.MAX_OP), "args": Map({})})
_OK_ENVELOPE = _envelope_bound({"ok": Map({})})
#: how far past its op's bound a request may go and still be decoded, so that a small
#: mistake (an unknown key, a wrong type) gets the schema's precise ``bad_request``
SLACK = Bound(1024, 16)
#: the largest error reply; any call may get one
ERR_BOUND = _envelope_bound(
    {"err": Map({"code": Str(envelope.MAX_CODE), "msg": Str(envelope.MAX_MSG)})}
)


def request_bound(args: Schema) -> Bound:
    """The largest request envelope whose ``args`` fit ``args``."""
    b = bounds(args)
    return Bound(
        _REQUEST_ENVELOPE.size - _EMPTY.size + b.size,
        _REQUEST_ENVELOPE.items - _EMPTY.items + b.items,
    )


def reply_bound(ok: Schema | None, max_message: int) -> Bound:
    """The largest reply to a call whose ``ok`` fits ``ok`` (None: unknown, any size)."""
    if ok is None:
        return Bound(max_message, envelope.MAX_ITEMS)
    b = bounds(ok)
    return Bound(
        max(_OK_ENVELOPE.size - _EMPTY.size + b.size, ERR_BOUND.size),
        max(_OK_ENVELOPE.items - _EMPTY.items + b.items, ERR_BOUND.items),
    )


_DECODE_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "fluidfs.net.decode"
)


def decode_limiter(threads: int = DEFAULT_LIMITS.decode_threads) -> trio.CapacityLimiter:
    """The per-``trio.run`` limiter for decoding large messages off the loop (its own
    threads: never the filesystem's limiter nor the frame crypto's)."""
    try:
        return _DECODE_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(threads)
        _DECODE_LIMITER.set(limiter)
        return limiter


class Dispatcher(Protocol):
    """What ``serve_connection`` needs from the service.

    ``schemas`` maps each served op to the schema of its ``args`` (e.g.
    ``messages.REQUEST_SCHEMAS``). ``handle`` returns the reply map or raises ``RpcError``.
    """

    schemas: Mapping[str, Schema]

    async def handle(self, peer_key: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Serve one validated request from ``peer_key``."""
        ...


class _Waiter:
    __slots__ = ("bound", "event", "result", "views")

    def __init__(self, bound: Bound, views: bool = False) -> None:
        self.bound = bound
        self.views = views  # the reply's schema keeps long byte strings as views
        self.event = trio.Event()
        self.result: dict[str, Any] | RpcError | None = None


class RpcConnection:
    """Calls and (optionally) serves RPCs over one channel. Needs ``run()`` running.

    ``budget``: this connection's share of the node's memory budget (a private one if
    None: the peer counts as a partner, with ``max_bytes`` or ``partner_conn_bytes``).
    ``idle_timeout``: close after that many seconds of nothing (None: never).
    """

    def __init__(
        self,
        channel: SecureChannel,
        dispatcher: Dispatcher | None = None,
        *,
        ops: Mapping[str, OpSpec] = OPS,
        limits: NetLimits = DEFAULT_LIMITS,
        budget: ConnBudget | None = None,
        max_handlers: int | None = None,
        max_bytes: int | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.channel = channel
        self.dispatcher = dispatcher
        self.ops = ops
        self.limits = limits
        if budget is None:
            own = limits
            if max_bytes is not None:
                own = dataclasses.replace(
                    limits,
                    node_bytes=max_bytes,
                    stranger_bytes=max_bytes,
                    partner_conn_bytes=max_bytes,
                    stranger_conn_bytes=max_bytes,
                )
            budget = NodeBudget(own).connection(lambda: True)
        self._budget = budget
        self.idle_timeout = idle_timeout
        self._slots = trio.Semaphore(max_handlers or limits.max_handlers)
        self._running = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, _Waiter] = {}
        self._dead: str | None = None
        self.peer_closed = False  # the peer ended the connection in an orderly way
        self._started = False
        self._scope: trio.CancelScope | None = None
        self._frame_started = 0.0  # when the frame now arriving announced its length
        # paused while the frame waits for our own download limit: not the peer's time
        self._frame_deadline = Deadline(
            lambda: self._frame_started, lambda t: setattr(self, "_frame_started", t)
        )
        self._sends: dict[object, float] = {}  # replies being sent, and since when
        self._frame_hold: Hold | None = None
        self._last_active = trio.current_time()
        schemas = dispatcher.schemas if dispatcher is not None else {}
        self._requests = {op: request_bound(schema) for op, schema in schemas.items()}
        self._largest_request = min(
            max((b.size for b in self._requests.values()), default=0), channel.max_message
        )

    @property
    def peer_key(self) -> bytes:
        """The peer's proven Ed25519 identity (32 bytes)."""
        return self.channel.peer_key

    @property
    def closed(self) -> bool:
        """True once the connection has ended; further calls fail at once."""
        return self._dead is not None

    @property
    def idle_for(self) -> float | None:
        """Seconds since the last activity, or None while calls, handlers or a frame are
        under way (admission evicts the longest-idle stranger when full)."""
        if self._pending or self._running or self._sends or self._frame_hold is not None:
            return None
        return trio.current_time() - self._last_active

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
                    nursery.start_soon(self._watch)
                    reason = await self._read_loop(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._shutdown(reason)
            if self._frame_hold is not None:
                self._frame_hold.release()
                self._frame_hold = None
            with trio.CancelScope(shield=True):
                await self.channel.aclose()

    async def aclose(self) -> None:
        """End the connection: pending calls fail with ``RpcConnectionLost``."""
        self._shutdown("connection closed locally")
        await self.channel.aclose()

    def close_soon(self, reason: str) -> None:
        """End the connection without waiting (``run()`` closes the channel)."""
        self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        if self._scope is not None:
            self._scope.cancel()
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.result = RpcConnectionLost(self._dead)
            waiter.event.set()

    def _touch(self) -> None:
        self._last_active = trio.current_time()

    async def _watch(self) -> None:
        """End the connection when a frame body, a reply or idleness takes too long.

        One task per connection that looks every quarter of the shortest timeout (so each
        fires up to 25% late), instead of a cancel scope around every frame and reply,
        which cost 15% of RPC throughput.
        """
        limits, idle = self.limits, self.idle_timeout
        step = min(limits.frame_timeout, limits.send_timeout, idle or float("inf")) / 4
        while True:
            await trio.sleep(step)
            now = trio.current_time()
            if self._frame_hold is not None and now - self._frame_started > limits.frame_timeout:
                why = f"frame body not received within {limits.frame_timeout:g} s"
            elif self._sends and now - min(self._sends.values()) > limits.send_timeout:
                why = f"reply not taken within {limits.send_timeout:g} s"
            elif idle is not None and (self.idle_for or 0.0) >= idle:
                why = f"idle for {idle:g} s"
            else:
                continue
            log.debug("closing connection to %s: %s", _hex(self.peer_key), why)
            self._shutdown(why)
            return

    # -- reading ---------------------------------------------------------------------------

    def _may_receive(self, n: int) -> bool:
        """Could a frame of ``n`` message bytes be legitimate from this peer now?"""
        if any(w.bound.size >= n for w in self._pending.values()):
            return True
        return n <= self._largest_request and self._budget.is_partner()

    async def _before_body(self, n: int) -> None:
        """Channel hook: refuse or reserve a frame from its length, before its body."""
        self._touch()
        limits = self.limits
        if n > limits.small_frame and not self._may_receive(n):
            raise FrameError(f"frame of {n} bytes, more than anything this peer may send now")
        items = min(n, limits.max_items)
        cost = 2 * max(n, buffer_cost(n)) + items * limits.item_overhead
        budget = self._budget
        self._frame_hold = budget.try_reserve(cost) or await budget.reserve(cost)
        self._frame_started = trio.current_time()

    async def _receive(self) -> bytes | str:
        """The next message, or why the connection ends."""
        try:
            return await self.channel.receive(self._before_body, self._frame_deadline)
        except ChannelClosed as exc:
            self.peer_closed = True
            return str(exc)
        except FrameError as exc:
            log.info("dropping connection from %s: %s", _hex(self.peer_key), exc)
            return str(exc)
        except (ChannelError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            return str(exc) or "connection closed"

    async def _read_loop(self, nursery: trio.Nursery) -> str:
        limits = self.limits
        frame: bytes | str | None = None
        while True:
            frame = None  # let go of the last frame before receiving the next one
            await self._budget.pace()
            frame = await self._receive()
            if isinstance(frame, str):
                return frame
            hold, self._frame_hold = self._frame_hold, None
            assert hold is not None
            self._touch()
            head = None
            try:
                head = envelope.peek(frame, limits.max_items)
                hold.shrink(2 * len(frame) + head.items * limits.item_overhead)  # buffers gone
                if head.op:
                    refusal = self._refuse_request(head, len(frame))
                    if refusal is not None:
                        hold.release()
                        await self._reply(refusal)
                        continue
                elif head.reply and not self._reply_fits(head, len(frame)):
                    hold.release()
                    continue
                # only the replies of calls whose op declares views (RetrieveShard) have
                # their long byte strings sliced out of the frame: everything else, and
                # everything a handler gets, is bytes as before
                waiting = self._pending.get(head.id) if head.reply else None
                views = waiting is not None and waiting.views
                if len(frame) >= limits.decode_offload:
                    msg = await trio.to_thread.run_sync(
                        envelope.decode, frame, head, views,
                        limiter=decode_limiter(limits.decode_threads),
                    )
                else:
                    msg = envelope.decode(frame, head, views)
            except envelope.EnvelopeError as exc:
                hold.release()
                if exc.id is None:
                    log.info("dropping connection from %s: %s", _hex(self.peer_key), exc)
                    return f"protocol violation by peer: {exc.why}"
                reply = exc.reply or (head is not None and head.reply)
                waiter = self._pending.pop(exc.id, None) if reply else None
                if waiter is not None:  # a malformed reply fails its call; we answer no reply
                    waiter.result = RpcError("bad_reply", exc.why)
                    waiter.event.set()
                else:
                    await self._reply(envelope.encode_err(exc.id, exc.code, exc.why))
                continue
            size = len(frame)
            frame = None
            hold.shrink(size + head.items * limits.item_overhead)
            if isinstance(msg, envelope.Request):
                await self._slots.acquire()
                self._running += 1
                try:
                    need = self._reply_reserve(msg.op)
                    budget = self._budget
                    reply = budget.try_reserve(need, hold) or await budget.reserve(need, hold)
                except BaseException:
                    self._running -= 1
                    self._slots.release()
                    hold.release()
                    raise
                nursery.start_soon(self._serve_one, msg, hold, reply)
            else:
                self._route_reply(msg)
                hold.release()
            del msg

    def _refuse_request(self, head: envelope.Head, size: int) -> bytes | None:
        """An error reply for a request refused from its head alone (None: go on)."""
        assert head.op is not None
        bound = self._requests.get(head.op)
        if bound is None:
            return envelope.encode_err(head.id, "unknown_op", f"unknown op {head.op[:64]!r}")
        if size > bound.size + SLACK.size or head.items > bound.items + SLACK.items:
            return envelope.encode_err(
                head.id, "too_large", f"{head.op} request of {size} bytes, {head.items} items"
            )
        return None

    def _reply_reserve(self, op: str) -> int:
        """Bytes to hold for a request's handler and its reply until the reply is sent:
        the decoded result, the encoded reply and its encrypted frame. An op without a
        response schema (only tests have such ops) reserves as if its reply were a small
        frame and overdraws the budget if it is larger."""
        spec = self.ops.get(op)
        limits = self.limits
        if spec is None:
            bound = Bound(limits.small_frame, envelope.MAX_ITEMS)
        else:
            bound = reply_bound(spec.response, self.channel.max_message)
        size = min(bound.size, self.channel.max_message)
        return (
            size
            + max(size, buffer_cost(size))
            + bound.items * limits.item_overhead
            + limits.handler_overhead
        )

    def _reply_fits(self, head: envelope.Head, size: int) -> bool:
        """False (and the call failed) for a reply larger than its call's op allows."""
        waiter = self._pending.get(head.id)
        if waiter is None:
            log.debug("reply %d from %s matches no pending call", head.id, _hex(self.peer_key))
            return False
        if size > waiter.bound.size or head.items > waiter.bound.items:
            del self._pending[head.id]
            waiter.result = RpcError(
                "bad_reply", f"reply of {size} bytes, {head.items} items is larger than allowed"
            )
            waiter.event.set()
            return False
        return True

    # -- client side -----------------------------------------------------------------------

    async def call(
        self,
        op: str,
        args: dict[str, Any],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        priority: int = SERVE,
        tail: bytes | bytearray | memoryview | None = None,
    ) -> dict[str, Any]:
        """Call ``op`` on the peer and return its ``ok`` map.

        ``tail``: the bytes of the one ``envelope.TAIL`` in ``args`` (the last item they
        encode), sent from this buffer without a copy (``envelope.encode_request_parts``);
        the schema checks ``args`` with an empty byte string in its place.

        ``priority``: the request's turn under an upload limit (``net/bandwidth.py``);
        time spent waiting for that turn does not count against ``timeout``.

        ``args`` is checked against the op's request schema first (``SchemaError`` for a
        bug of ours); the reply against its response schema (``RpcError("bad_reply")``;
        a reply larger than the schema allows is refused before it is decoded).
        Ops missing from ``ops`` get only envelope checks. Raises ``RpcError`` with the
        peer's code, ``RpcTimeout`` after ``timeout`` seconds (covering the send too) and
        ``RpcConnectionLost`` if the connection is or becomes dead.
        """
        if self._dead is not None:
            raise RpcConnectionLost(self._dead)
        spec = self.ops.get(op)
        if spec is not None:
            validate(spec.request, args if tail is None else _without_tail(args), "args")
        rid = next(self._ids)
        data: bytes | tuple[bytes, bytes | bytearray | memoryview]
        if tail is None:
            data = envelope.encode_request(rid, op, args)
            size = len(data)
        else:
            data = envelope.encode_request_parts(rid, op, args, tail)
            size = len(data[0]) + memoryview(tail).nbytes
        if size > self.channel.max_message:
            raise RpcError("too_large", f"{op} request of {size} bytes exceeds one frame")
        bound = reply_bound(spec.response if spec else None, self.channel.max_message)
        views = spec is not None and takes_views(spec.response)
        waiter = self._pending[rid] = _Waiter(bound, views)
        self._touch()
        try:
            with trio.move_on_after(timeout) as scope:
                await self._send_request(data, priority, scope)
                del data
                await waiter.event.wait()
        finally:
            self._pending.pop(rid, None)
            self._touch()
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

    async def _send_request(
        self,
        data: bytes | tuple[bytes, bytes | bytearray | memoryview],
        priority: int,
        scope: trio.CancelScope,
    ) -> None:
        # the queue for our own upload limit does not count against the call's timeout
        deadline = Deadline(lambda: scope.deadline, lambda t: setattr(scope, "deadline", t))
        try:
            await self.channel.send(data, priority=priority, deadline=deadline)
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

    async def _serve_one(self, req: envelope.Request, request: Hold, reply: Hold) -> None:
        try:
            rid, op = req.id, req.op
            data = await self._dispatch(req)
            del req
            request.release()
            need = len(data) + max(len(data), buffer_cost(len(data)))
            need += self.limits.handler_overhead
            reply.shrink(need)
            if need > reply.amount:
                if op in self.ops:
                    # the reservation was clamped to a stranger's share: the reply would
                    # hold more than that until the peer reads it, so it is not sent
                    data = envelope.encode_err(
                        rid, "too_large", f"{op} reply of {len(data)} bytes needs an agreement"
                    )
                else:
                    reply.overdraw(need - reply.amount)
            await self._reply(data)
        finally:
            request.release()
            reply.release()
            self._running -= 1
            self._slots.release()
            self._touch()

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
        """Send a reply; a peer that does not take it within ``send_timeout`` is dropped
        (by ``_watch``)."""
        token = object()
        self._sends[token] = trio.current_time()
        # the queue for our own upload limit does not count against send_timeout
        deadline = Deadline(lambda: self._sends[token], lambda t: self._sends.__setitem__(token, t))
        try:
            # if the connection is gone, the read loop notices and cleans up
            with contextlib.suppress(ChannelError, trio.ClosedResourceError):
                await self.channel.send(data, priority=SERVE, deadline=deadline)
        finally:
            del self._sends[token]


async def serve_connection(
    channel: SecureChannel,
    dispatcher: Dispatcher,
    *,
    ops: Mapping[str, OpSpec] = OPS,
    limits: NetLimits = DEFAULT_LIMITS,
    budget: ConnBudget | None = None,
    idle_timeout: float | None = None,
) -> None:
    """Serve RPCs from the peer on ``channel`` until it disconnects; closes the channel.

    Handler replies are checked against ``ops`` response schemas (a failing reply becomes
    an ``internal`` error and a log line). Never raises because of anything the peer sends
    (only cancellation propagates).
    """
    conn = RpcConnection(
        channel, dispatcher, ops=ops, limits=limits, budget=budget, idle_timeout=idle_timeout
    )
    await conn.run()


def _hex(key: bytes) -> str:
    return key.hex()[:16]


def _without_tail(value: Any) -> Any:
    """*value* with ``envelope.TAIL`` replaced by an empty byte string (for the schema)."""
    if value is envelope.TAIL:
        return b""
    if isinstance(value, dict):
        return {k: _without_tail(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_tail(v) for v in value]
    return value
