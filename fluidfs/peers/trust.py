"""Trust: how much a peer has earned, from the promises it kept and broke.

As in the Fluidbackup paper, trust rises geometrically with each success (a
shard stored, retrieved, or an audit passed) and falls with each failure.
When a peer's trust rises, the peer that introduced it (its referrer) gains a
share of the rise; when it falls, the referrer loses the same share, so
referring liars never pays. New peers are *vetted*: until they have succeeded
a number of times, placement gives them only a small weight.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrustPolicy:
    """The parameters of the trust model (all configurable)."""

    initial: float = 1.0  # trust of a peer we just met
    rise: float = 1.05  # multiplier on each success
    fall: float = 0.7  # multiplier on each failure
    floor: float = 0.01
    ceiling: float = 100.0
    referral_share: float = 0.1  # fraction of a referred peer's change passed to its referrer
    vetting_checks: int = 10  # successes before a new peer gets its full weight
    vetting_weight: float = 0.1  # weight factor while vetting

    def after(self, trust: float, ok: bool) -> float:
        """Trust after one success or failure."""
        value = trust * (self.rise if ok else self.fall)
        return min(self.ceiling, max(self.floor, value))

    def clamp(self, trust: float) -> float:
        """Keep trust within [floor, ceiling]."""
        return min(self.ceiling, max(self.floor, trust))

    def weight(self, trust: float, successes: int) -> float:
        """Placement weight of a peer: its trust, damped while it is being vetted."""
        return trust * (1.0 if successes >= self.vetting_checks else self.vetting_weight)


DEFAULT_POLICY = TrustPolicy()
