"""The network layer's resource limits in one place (docs/protocol.md, section 5).

``NetLimits`` is what a node gives its connection pool (``fluidfs.peers.connections``) and what
``serve_tcp`` / ``RpcConnection`` take; every cap a stranger can run into is a field here.
Defaults are the production values; tests shrink the timeouts (``fluidfs serve
--net-limits idle_timeout=1,...``, parsed by ``parse_limits``).

Memory is counted in *bytes held for a peer*: a frame being received (its ciphertext and
plaintext, about twice its length), a decoded message (its length plus ``item_overhead``
per CBOR item, measured at <= 80 bytes with CPython 3.11 + cbor2 6), a running handler
(``handler_overhead``) and a reply until it is sent (twice its bound: the encoded reply
and the encrypted frame). Three levels must each have room: the connection
(``partner_conn_bytes`` or ``stranger_conn_bytes``), the strangers' share of the node
(``stranger_bytes``, strangers only) and the node (``node_bytes``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "NetLimits", "parse_limits"]

KIB = 1 << 10
MIB = 1 << 20


@dataclass(frozen=True)
class NetLimits:
    """Caps, timeouts and budgets of the peer port. Values and reasons: docs/protocol.md 5."""

    # -- connections (fluidfs.net.admission) -----------------------------------------------
    max_connections: int = 256  # inbound connections, established or in the handshake
    max_strangers: int = 192  # of which from peers without an active agreement
    max_strangers_per_ip: int = 32  # per IPv4 address / IPv6 /64
    max_per_identity: int = 4  # inbound connections per proven identity
    max_handshakes: int = 64  # handshakes in progress (the oldest is dropped when full)
    max_handshakes_per_ip: int = 32  # including those waiting for their turn
    handshake_timeout: float = 5.0  # seconds for the whole responder handshake
    connect_rate_per_ip: float = 64.0  # handshakes a second per address, on average
    connect_burst_per_ip: int = 128  # ... and at once
    connect_queue_per_ip: int = 16  # connections over the rate that wait for their turn
    idle_timeout: float = 60.0  # no calls, handlers or frames for this long: close
    min_idle_to_evict: float = 1.0  # a stranger idle at least this long may be evicted
    # -- frames and messages (fluidfs.net.rpc, fluidfs.net.envelope) -----------------------
    small_frame: int = 128 * KIB  # any peer may send frames up to this size
    frame_timeout: float = 60.0  # a frame's body must arrive within this after its header
    send_timeout: float = 60.0  # a reply that cannot be sent within this ends the connection
    max_handlers: int = 64  # requests running at once per connection
    max_items: int = 4096  # CBOR items per message (largest v1 message: ~1,300)
    item_overhead: int = 128  # bytes a decoded CBOR item may take beyond its wire bytes
    handler_overhead: int = 8 * KIB  # a running handler: task, frames, locals
    decode_offload: int = 1 * MIB  # messages this large are decoded in a worker thread
    decode_threads: int = 2  # worker threads for decoding (not the filesystem's)
    # -- memory budgets (fluidfs.net.budget) -----------------------------------------------
    node_bytes: int = 192 * MIB  # everything held for all peers together
    stranger_bytes: int = 64 * MIB  # of which for peers without an active agreement
    partner_conn_bytes: int = 48 * MIB  # one partner's connection
    stranger_conn_bytes: int = 1 * MIB  # one stranger's connection
    # -- message rates (fluidfs.net.budget.RateBucket) -------------------------------------
    stranger_msg_rate: float = 200.0  # messages a second from all strangers together
    stranger_msg_burst: int = 400  # ... and at once
    stranger_conn_msg_rate: float = 20.0  # messages a second from one stranger's connection
    stranger_conn_msg_burst: int = 40  # ... and at once

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"net limit {f.name} must be a positive number, not {value!r}")
        if self.max_strangers > self.max_connections:
            raise ValueError("max_strangers cannot exceed max_connections")
        if self.stranger_bytes > self.node_bytes:
            raise ValueError("stranger_bytes cannot exceed node_bytes")


DEFAULT_LIMITS = NetLimits()


def parse_limits(text: str) -> NetLimits:
    """``"idle_timeout=1,max_strangers_per_ip=4"`` → ``NetLimits`` with those fields changed.

    Raises ``ValueError`` for an unknown name or a bad value (argparse shows it).
    """
    fields = {f.name: f for f in dataclasses.fields(NetLimits)}
    changes: dict[str, int | float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(f"unknown net limit {name!r} (known: {', '.join(sorted(fields))})")
        kind = float if fields[name].type in ("float", float) else int
        try:
            changes[name] = kind(raw.strip())
        except ValueError:
            raise ValueError(f"net limit {name} needs a {kind.__name__}, not {raw!r}") from None
    return dataclasses.replace(DEFAULT_LIMITS, **changes)
