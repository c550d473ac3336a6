"""Fault injection for tests and benchmarks: a peer service that misbehaves on purpose.

Production nodes never set these. They reach the service only through
``Node(config, faults=FaultInjection(...))``, which the CLI builds from hidden options
(``--fault-rate``, ``--lie-on-retrieve``) that the test harness passes to ``fluidfs serve``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultInjection:
    """How a peer service should misbehave (all off by default)."""

    fault_rate: float = 0.0  # fail this share of shard requests with an RPC error
    lie_on_retrieve: bool = False  # serve corrupted shards while answering audits honestly

    def served(self, data: bytes) -> bytes:
        """The shard as retrieval hands it out: its first byte flipped when lying."""
        if self.lie_on_retrieve and data:
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data


NO_FAULTS = FaultInjection()
