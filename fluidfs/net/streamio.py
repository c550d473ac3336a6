"""Exact-length reads from a ``trio.abc.Stream`` straight into caller buffers.

For a ``trio.SocketStream`` the bytes go from the kernel into the destination buffer with
``recv_into`` (no intermediate ``bytes`` object); for any other stream ``receive_some`` is
asked for exactly the missing amount, so nothing is ever over-read and no leftover buffer
is needed.
"""

from __future__ import annotations

import trio

from .bandwidth import Deadline, TokenBucket, on_wire, paused


class StreamEOF(Exception):
    """The stream ended before the requested bytes arrived; ``got`` says how many did."""

    def __init__(self, got: int) -> None:
        super().__init__(f"end of stream after {got} bytes")
        self.got = got


class ExactReader:
    """Reads exact byte counts from one stream. Not safe for concurrent use."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.consumed = 0  # bytes the last/current readinto() has taken from the stream

    async def readinto(
        self,
        view: memoryview,
        down: TokenBucket | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        """Fill ``view`` completely.

        With a limited ``down`` bucket at most one chunk is read at a time and paid for
        before the next read (``deadline`` is paused meanwhile); an unlimited one counts.

        Raises ``StreamEOF`` if the stream ends first and ``trio.BrokenResourceError`` if the
        connection breaks. If interrupted, ``consumed`` says how many bytes were taken.
        """
        want = len(view)
        got = self.consumed = 0
        sock = self._sock
        pace = down if down is not None and down.limited else None
        while got < want:
            ask = want - got if pace is None else min(want - got, pace.chunk)
            if sock is not None:
                try:
                    n = await sock.recv_into(view[got:], ask)
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
            else:
                chunk = await self.stream.receive_some(ask)
                n = len(chunk)
                view[got : got + n] = chunk
            if n == 0:
                raise StreamEOF(got)
            got += n
            self.consumed = got
            if pace is not None:
                with paused(deadline):
                    await pace.take(on_wire(n))
            elif down is not None:
                down.count(on_wire(n))

    async def read_exactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes (small reads, e.g. handshake messages)."""
        buf = bytearray(n)
        await self.readinto(memoryview(buf))
        return bytes(buf)
