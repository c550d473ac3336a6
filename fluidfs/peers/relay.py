"""A relay: splices streams to peers that cannot be dialled (``fluidfs serve --relay``).

A node behind a NAT without UPnP registers here (``RelayRegister`` on an ordinary secure
channel: the identity it registers is the one it proved in the handshake, so nobody can
register an id it does not own) and renews the registration before ``registration_ttl``
runs out. A dialler opens a raw stream to our peer port and sends CONNECT naming that
peer (net/relaywire.py); we send the peer ``RelayIncoming`` with a fresh random token on
its registration's connection; it opens a stream back with ACCEPT and the token; both get
STATUS ok and from then on we only copy bytes. The two nodes run the fluidfs handshake
end to end over the splice, so we carry their HELLOs and ciphertext frames and hold no key.

Everything a stranger can make us spend is bounded by ``RelayPolicy``: registered peers,
relayed pairs per registered peer and in all (a CONNECT over a cap gets STATUS busy),
CONNECTs passed on to one peer a second (each makes it open a stream), bytes a second
each way of one pair (a token bucket, net/bandwidth.py), the time a peer has to call
back, and idle pairs (no byte either way for ``idle_timeout``) are cut.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.bandwidth import TokenBucket
from fluidfs.net.errors import RpcError
from fluidfs.net.relaywire import (
    HEAD_LEN,
    KIND_ACCEPT,
    KIND_CONNECT,
    Preamble,
    RelayError,
    Status,
    body_len,
    check_head,
    make_status,
)
from fluidfs.net.streamio import ExactReader, StreamEOF

log = logging.getLogger(__name__)

SPLICE_CHUNK = 64 << 10


@dataclass(frozen=True)
class RelayPolicy:
    """The bounds of a relay (docs/protocol.md §5 "Relays")."""

    max_registered: int = 64  # peers registered at once
    max_per_peer: int = 8  # relayed pairs to one registered peer at once
    max_relayed: int = 128  # relayed pairs in all
    calls_per_second: float = 2.0  # CONNECTs passed on to one registered peer, on average
    calls_burst: int = 8  # ... and at once
    rate: float | None = 1 << 20  # bytes a second, each way, of one relayed pair (None: no limit)
    idle_timeout: float = 300.0  # a pair with no byte either way for this long is cut
    callback_timeout: float = 10.0  # seconds the peer has to open its stream back
    preamble_timeout: float = 5.0  # seconds to read a CONNECT or ACCEPT
    registration_ttl: int = 90  # seconds a registration lasts unless renewed


#: an op handler: (the caller's proven key, validated args) → reply (as service/ops.py)
Op = Callable[[bytes, dict[str, Any]], Awaitable[dict[str, Any]]]

#: ``ask(peer, token)``: send the registered peer ``RelayIncoming`` (raises on failure)
Ask = Callable[[bytes, bytes], Awaitable[None]]


class _Pending:
    """A CONNECT waiting for the peer's ACCEPT."""

    def __init__(self, target: bytes) -> None:
        self.target = target
        self.stream: trio.abc.Stream | None = None
        self.arrived = trio.Event()


async def read_preamble(stream: trio.abc.Stream) -> Preamble:
    """Read a CONNECT or ACCEPT (raises ``RelayError``; no timeout of its own)."""
    reader = ExactReader(stream)
    try:
        head = await reader.read_exactly(HEAD_LEN)
        kind = check_head(head)
        body = await reader.read_exactly(body_len(kind))
    except StreamEOF:
        raise RelayError("the stream ended inside a relay preamble") from None
    return Preamble(kind, body)


class RelayServer:
    """Registrations and relayed pairs of one relay node."""

    def __init__(self, policy: RelayPolicy, ask: Ask) -> None:
        self.policy = policy
        self._ask = ask
        self._registered: dict[bytes, float] = {}  # peer → when it expires (trio clock)
        self._pending: dict[bytes, _Pending] = {}  # token → CONNECT waiting for it
        self._per_peer: Counter[bytes] = Counter()
        self._calls: dict[bytes, tuple[float, float]] = {}  # peer → (call tokens, when)
        self.relayed = 0  # pairs being set up or spliced now
        self.bytes_relayed = 0

    # -- registrations (the RelayRegister op) ------------------------------------------------

    def ops(self) -> dict[str, Op]:
        """The ops a relay answers, by wire name."""
        return {"RelayRegister": self._register_op}

    async def _register_op(self, peer: bytes, _args: dict[str, Any]) -> dict[str, Any]:
        return {"ttl": self.register(peer)}

    def register(self, peer: bytes) -> int:
        """Register (or renew) *peer*, proven by its connection; the seconds it lasts.

        Raises ``RpcError("busy")`` when ``max_registered`` other peers are registered.
        """
        now = trio.current_time()
        for key in [k for k, until in self._registered.items() if until <= now]:
            del self._registered[key]
            self._calls.pop(key, None)
        if peer not in self._registered and len(self._registered) >= self.policy.max_registered:
            raise RpcError("busy", f"this relay keeps {self.policy.max_registered} peers")
        self._registered[peer] = now + self.policy.registration_ttl
        return self.policy.registration_ttl

    def is_registered(self, peer: bytes) -> bool:
        """True while *peer*'s registration lasts."""
        return self._registered.get(peer, 0.0) > trio.current_time()

    @property
    def registered(self) -> int:
        """Peers registered now."""
        now = trio.current_time()
        return sum(1 for until in self._registered.values() if until > now)

    def load(self) -> dict[str, Any]:
        """What the relay spends now against its bounds (``fluidfs status``): peers
        registered, relayed connections, bytes copied since the node started, and the
        per-connection limit (bytes a second each way; None: no limit)."""
        return {
            "registered": self.registered,
            "max_registered": self.policy.max_registered,
            "relayed": self.relayed,
            "max_relayed": self.policy.max_relayed,
            "max_per_peer": self.policy.max_per_peer,
            "bytes_relayed": self.bytes_relayed,
            "rate": self.policy.rate,
        }

    # -- raw streams (a preamble on our peer port) -------------------------------------------

    async def serve(self, stream: trio.abc.Stream, preamble: Preamble) -> None:
        """Answer a CONNECT or ACCEPT read from *stream*; the stream is ours to close."""
        if preamble.kind == KIND_CONNECT:
            await self._connect(stream, preamble.value)
        elif preamble.kind == KIND_ACCEPT:
            await self._accept(stream, preamble.value)
        else:
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.abc.Stream, status: Status) -> None:
        with trio.move_on_after(1):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(make_status(status))
        await trio.aclose_forcefully(stream)

    async def _accept(self, stream: trio.abc.Stream, token: bytes) -> None:
        pending = self._pending.get(token)
        if pending is None or pending.stream is not None:
            await self._refuse(stream, Status.BAD_TOKEN)
            return
        pending.stream = stream  # the CONNECT's task splices it (and closes it)
        pending.arrived.set()

    async def _connect(self, stream: trio.abc.Stream, target: bytes) -> None:
        policy = self.policy
        if not self.is_registered(target):
            await self._refuse(stream, Status.NOT_REGISTERED)
            return
        if self.relayed >= policy.max_relayed or self._per_peer[target] >= policy.max_per_peer \
                or not self._take_call(target):
            await self._refuse(stream, Status.BUSY)
            return
        self.relayed += 1
        self._per_peer[target] += 1
        token = secrets.token_bytes(16)
        pending = self._pending[token] = _Pending(target)
        try:
            with trio.move_on_after(policy.callback_timeout):
                try:
                    await self._ask(target, token)
                except Exception as exc:  # the peer is gone or refused: a failed CONNECT
                    log.debug("relay: peer %s did not take a call: %s",
                              encode_peer_id(target)[:12], exc)
                else:
                    await pending.arrived.wait()
            del self._pending[token]
            other = pending.stream
            if other is None:
                await self._refuse(stream, Status.NO_CALLBACK)
                return
            try:
                with trio.move_on_after(policy.callback_timeout):
                    await stream.send_all(make_status(Status.OK))
                    await other.send_all(make_status(Status.OK))
                await self._splice(stream, other)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(other)
                await trio.aclose_forcefully(stream)
        finally:
            self._pending.pop(token, None)
            if pending.stream is not None:
                await trio.aclose_forcefully(pending.stream)
            self.relayed -= 1
            self._per_peer[target] -= 1
            if not self._per_peer[target]:
                del self._per_peer[target]

    def _take_call(self, target: bytes) -> bool:
        """Spend one of *target*'s call tokens: each CONNECT makes the peer open a
        stream, so strangers may not make it do so faster than ``calls_per_second``."""
        policy, now = self.policy, trio.current_time()
        tokens, then = self._calls.get(target, (float(policy.calls_burst), now))
        tokens = min(float(policy.calls_burst), tokens + (now - then) * policy.calls_per_second)
        if tokens < 1:
            return False
        self._calls[target] = (tokens - 1, now)
        return True

    async def _splice(self, a: trio.abc.Stream, b: trio.abc.Stream) -> None:
        """Copy bytes both ways until either side ends or the pair is idle too long."""
        idle = self.policy.idle_timeout
        last = [trio.current_time()]

        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, bucket: TokenBucket,
                       done: trio.CancelScope) -> None:
            try:
                while True:
                    data = await src.receive_some(min(SPLICE_CHUNK, bucket.chunk))
                    if not data:
                        break
                    await bucket.take(len(data))
                    await dst.send_all(data)
                    self.bytes_relayed += len(data)
                    last[0] = trio.current_time()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                done.cancel()  # one side ended: the pair is over

        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(pump, a, b, TokenBucket(self.policy.rate), scope)
            nursery.start_soon(pump, b, a, TokenBucket(self.policy.rate), scope)
            while True:
                await trio.sleep_until(last[0] + idle)
                if trio.current_time() >= last[0] + idle:
                    log.debug("relay: cutting a pair idle for %s s", idle)
                    scope.cancel()
                    return
