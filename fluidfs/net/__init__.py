"""fluidfs network layer: secure channels, framing, RPC and message schemas (no files).

Modules: ``handshake`` + ``channel`` (authenticated encrypted frames), ``messages`` (op
schemas, in the language of ``fluidfs.wire.schema``), ``envelope`` (CBOR envelopes), ``rpc``
(``RpcConnection``, ``serve_connection``), ``tcp`` (``dial``, ``open_rpc``, ``serve_tcp``),
and the resource limits: ``limits`` (``NetLimits``), ``admission`` (connection caps),
``budget`` (memory held for peers). Wire format and limits: docs/protocol.md.
"""

from .channel import MAX_FRAME, SecureChannel, accept_channel, connect_channel
from .errors import (
    ChannelClosed,
    ChannelError,
    FrameError,
    HandshakeError,
    NetError,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
)
from .limits import DEFAULT_LIMITS, NetLimits
from .rpc import Dispatcher, RpcConnection, serve_connection
from .tcp import dial, open_rpc, serve_tcp

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_FRAME",
    "ChannelClosed",
    "ChannelError",
    "Dispatcher",
    "FrameError",
    "HandshakeError",
    "NetError",
    "NetLimits",
    "RpcConnection",
    "RpcConnectionLost",
    "RpcError",
    "RpcTimeout",
    "SecureChannel",
    "accept_channel",
    "connect_channel",
    "dial",
    "open_rpc",
    "serve_connection",
    "serve_tcp",
]
