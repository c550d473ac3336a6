"""The node's traffic with its peers as `fluidfs status` shows it: rates, limits, ETA.

The rates are measured on the node's ``Bandwidth`` (net/bandwidth.py), which every frame
to and from peers passes, limited or not: what the secure channel hands to TCP, not
TCP/IP headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from fluidfs.net.bandwidth import Bandwidth

RATE_WEIGHT = 0.3  # weight of the last second in each rate
MOVING = 1.0  # bytes per second: slower than this, uploads are not moving (no ETA)


@dataclass
class TrafficRate:
    """Bytes per second sent to and read from all peers, exponentially weighted over the
    last seconds."""

    bandwidth: Bandwidth
    send: float = 0.0
    receive: float = 0.0

    async def run(self) -> None:
        """Measure once a second until cancelled."""
        sent, read = self.bandwidth.up.total, self.bandwidth.down.total
        while True:
            await trio.sleep(1.0)
            now_sent, now_read = self.bandwidth.up.total, self.bandwidth.down.total
            self.send = (1 - RATE_WEIGHT) * self.send + RATE_WEIGHT * (now_sent - sent)
            self.receive = (1 - RATE_WEIGHT) * self.receive + RATE_WEIGHT * (now_read - read)
            sent, read = now_sent, now_read

    def figures(self, pending: int, upload_rate: float) -> dict[str, Any]:
        """The status figures: rates and limits in bytes per second (a limit None: none),
        and ``upload_eta``, the seconds until *pending* bytes of shards are on peers at
        *upload_rate* (0 when none are pending; None while uploads are not moving)."""
        if not pending:
            eta: float | None = 0.0
        elif upload_rate >= MOVING:
            eta = pending / upload_rate
        else:
            eta = None
        return {
            "send_rate": self.send,
            "receive_rate": self.receive,
            "limit_upload": self.bandwidth.up.rate,
            "limit_download": self.bandwidth.down.rate,
            "upload_eta": eta,
        }
