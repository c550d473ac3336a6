"""Exceptions raised by the network layer.

Two families:

* ``ChannelError`` and subclasses: the secure channel (handshake, framing, end of stream).
* ``RpcError`` and subclasses: a failed RPC call. ``RpcError`` carries a short machine code
  (``"unknown_op"``, ``"bad_request"``, ...) and a human message; the same pair travels on the
  wire in error replies. ``RpcTimeout`` and ``RpcConnectionLost`` are local failures that are
  also ``RpcError`` so callers can catch every failed call with one ``except RpcError``.
"""

from __future__ import annotations


class NetError(Exception):
    """Base class of every error raised by ``fluidfs.net``."""


class ChannelError(NetError):
    """A secure-channel failure."""


class HandshakeError(ChannelError):
    """The authenticated handshake failed (bad peer, wrong identity, timeout, garbage)."""


class FrameError(ChannelError):
    """A frame was malformed, oversized, tampered with, replayed or reordered.

    The channel is unusable afterwards (it is closed when the error comes from the peer).
    """


class ChannelClosed(ChannelError):
    """The peer closed the channel (or the connection ended at a frame boundary)."""


class RpcError(NetError):
    """A call failed with an error code, either sent by the peer or produced locally.

    ``code`` is a short ASCII identifier (see docs/protocol.md); ``msg`` is for humans.
    """

    def __init__(self, code: str, msg: str = "") -> None:
        super().__init__(code, msg)
        self.code = code
        self.msg = msg

    def __str__(self) -> str:
        return f"{self.code}: {self.msg}" if self.msg else self.code


class RpcTimeout(RpcError):
    """No reply arrived within the call's timeout."""

    def __init__(self, msg: str = "call timed out") -> None:
        super().__init__("timeout", msg)


class RpcConnectionLost(RpcError):
    """The connection ended before the reply arrived (or was already dead)."""

    def __init__(self, msg: str = "connection lost") -> None:
        super().__init__("connection_lost", msg)
