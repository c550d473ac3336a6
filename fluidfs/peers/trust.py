"""Trust: how much a peer has earned, from the promises it kept and broke.

As in the Fluidbackup paper, trust rises geometrically with each success (a
shard stored, retrieved, or an audit passed) and falls with each failure.
When a peer's trust rises, the peer that introduced it (its referrer) gains a
share of the rise; when it falls, the referrer loses the same share, so
referring liars never pays. New peers are *vetted*: until they have succeeded
a number of times, placement gives them only a small weight.

A peer *caught* serving a corrupt shard (blocks/suspects.py) drops to the floor at
once, and for ``caught_for`` (30 days) each success raises its trust by ``caught_rise``
only — a caught lie is evidence, not noise: passing audits it can answer from a good
copy it keeps must not buy back the trust a lie cost.
"""

from __future__ import annotations

import dataclasses
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
    caught_rise: float = 1.002  # multiplier on each success while caught lying
    caught_for: float = 30 * 24 * 3600.0  # how long a caught lie weighs (seconds)

    def after(self, trust: float, ok: bool, *, caught: bool = False) -> float:
        """Trust after one success or failure (*caught*: within its caught period)."""
        rise = self.caught_rise if caught else self.rise
        value = trust * (rise if ok else self.fall)
        return min(self.ceiling, max(self.floor, value))

    def clamp(self, trust: float) -> float:
        """Keep trust within [floor, ceiling]."""
        return min(self.ceiling, max(self.floor, trust))

    def weight(self, trust: float, successes: int) -> float:
        """Placement weight of a peer: its trust, damped while it is being vetted."""
        return trust * (1.0 if successes >= self.vetting_checks else self.vetting_weight)


DEFAULT_POLICY = TrustPolicy()


def parse_policy(text: str) -> TrustPolicy:
    """A policy from 'rise=1.05,fall=0.7,...' (any subset of the fields); ValueError if bad."""
    fields = {f.name: f.type for f in dataclasses.fields(TrustPolicy)}
    values: dict[str, float | int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"unknown trust parameter {name!r} (known: {', '.join(fields)})")
        values[name] = int(raw) if fields[name] in (int, "int") else float(raw)
    policy = TrustPolicy(**values)
    if not (0 < policy.fall <= 1 <= policy.rise and 0 < policy.floor <= policy.ceiling):
        raise ValueError("trust needs 0 < fall <= 1 <= rise and 0 < floor <= ceiling")
    if not (1 <= policy.caught_rise <= policy.rise and policy.caught_for >= 0):
        raise ValueError("trust needs 1 <= caught_rise <= rise and caught_for >= 0")
    return policy
