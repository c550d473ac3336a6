"""Placement: which peers get a block's shards.

Peers are sampled without replacement with probability proportional to their
weight (trust, damped while vetting, times the share of their promised space
still free), using the Efraimidis-Spirakis method: each peer draws
``u ** (1 / weight)`` and the largest keys win. The full ranking is returned so
that the first N are the sample and the rest stand by in case a store fails.
"""

from __future__ import annotations

import random


def rank(weights: dict[bytes, float], rng: random.Random | None = None) -> list[bytes]:
    """All peers with positive weight, in a weighted random order (heaviest likeliest first)."""
    draw = (rng or random).random
    keyed = [(draw() ** (1.0 / w), key) for key, w in weights.items() if w > 0]
    keyed.sort(reverse=True)
    return [key for _, key in keyed]
