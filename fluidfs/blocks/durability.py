"""How likely a backup is to lose data within a year: a Markov model of dead holders.

A backup whose blocks are spread over ``peers`` distinct peers, each block coded N-of-K
(12 shards, any 8 rebuild), is lost once N-K+1 of those peers are dead at the same time
before their shards were re-created: with many blocks, some block then has lost N-K+1
of its shards. (The bound is tight for a backup of many blocks spread evenly; a small
backup whose blocks cover few 5-peer subsets is safer than this says.)

The model is a continuous-time Markov chain on j, the number of the backup's peers that
are dead and not yet repaired: each live peer dies at rate 1/lifetime (j -> j+1), each
dead one is repaired at rate 1/repair_time (j -> j-1, repairs of different peers' shards
run side by side), and j = N-K+1 is loss. The answer is the probability of reaching loss
within the horizon starting from j = 0, from the matrix exponential of the generator.

Both inputs are what fluidfs can observe or bound: ``repair_days`` is the tolerance before
an agreement ends plus the time to re-create a dead peer's shards; ``lifetime_days`` the
mean time until a peer leaves for good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Matrix = list[list[float]]

YEAR_DAYS = 365.0


@dataclass(frozen=True)
class DurabilityModel:
    """The inputs of one estimate (times in days)."""

    peers: int  # distinct peers the backup's shards are spread over
    lifetime_days: float  # mean time until a peer leaves for good
    repair_days: float  # mean time from a peer's death to its shards re-created
    n: int = 12
    k: int = 8
    grouped: bool = False  # blocks kept within groups of N peers (peers/copysets.py)

    def loss_probability(self, horizon_days: float = YEAR_DAYS) -> float:
        """Probability that the backup loses data within *horizon_days*.

        Spread placement: any N-K+1 of all the peers. Grouped placement: N-K+1 within one
        group, the groups failing independently (the remainder of P/N joins a group).
        """
        if not self.grouped or self.peers < 2 * self.n:
            return loss_probability(
                self.peers, self.lifetime_days, self.repair_days, self.n, self.k, horizon_days
            )
        count = self.peers // self.n
        small = loss_probability(
            self.n, self.lifetime_days, self.repair_days, self.n, self.k, horizon_days
        )
        big = loss_probability(
            self.n + self.peers % self.n, self.lifetime_days, self.repair_days, self.n,
            self.k, horizon_days,
        )
        return 1.0 - (1.0 - small) ** (count - 1) * (1.0 - big)


def loss_probability(
    peers: int,
    lifetime_days: float,
    repair_days: float,
    n: int = 12,
    k: int = 8,
    horizon_days: float = YEAR_DAYS,
) -> float:
    """Probability of reaching N-K+1 dead, unrepaired peers within *horizon_days*.

    ValueError for inputs that describe no backup (fewer peers than shards, non-positive
    times).
    """
    if not 0 < k <= n <= peers:
        raise ValueError(f"need 0 < k <= n <= peers, got k={k} n={n} peers={peers}")
    if lifetime_days <= 0 or repair_days <= 0 or horizon_days < 0:
        raise ValueError("lifetime, repair time and horizon must be positive")
    lost = n - k + 1
    die = 1.0 / lifetime_days
    mend = 1.0 / repair_days
    q: Matrix = [[0.0] * (lost + 1) for _ in range(lost + 1)]
    for dead in range(lost):
        q[dead][dead + 1] = (peers - dead) * die
        if dead > 0:
            q[dead][dead - 1] = dead * mend
    for state, row in enumerate(q):
        row[state] = -sum(row)
    p = _expm([[value * horizon_days for value in row] for row in q])
    return min(1.0, max(0.0, p[0][lost]))


def _matmul(a: Matrix, b: Matrix) -> Matrix:
    size = len(a)
    return [
        [sum(a[i][m] * b[m][j] for m in range(size)) for j in range(size)]
        for i in range(size)
    ]


def _expm(a: Matrix) -> Matrix:
    """exp(A) by scaling and squaring with a Taylor series (A is tiny: N-K+2 square)."""
    size = len(a)
    norm = max(sum(abs(v) for v in row) for row in a)
    squarings = max(0, math.ceil(math.log2(norm / 0.25))) if norm > 0.25 else 0
    scale = 2.0**squarings
    scaled = [[v / scale for v in row] for row in a]
    result = [[float(i == j) for j in range(size)] for i in range(size)]
    term = [row[:] for row in result]
    for power in range(1, 30):
        term = [[v / power for v in row] for row in _matmul(term, scaled)]
        result = [
            [r + t for r, t in zip(rr, tr, strict=True)]
            for rr, tr in zip(result, term, strict=True)
        ]
    for _ in range(squarings):
        result = _matmul(result, result)
    return result


ASSUMED_LIFETIME_DAYS = 730.0  # until peers' deaths are observed: two years, as issue 18
OBSERVED_WINDOW_DAYS = 30.0  # agreement ends counted over at most this many days


@dataclass(frozen=True)
class Estimate:
    """This backup's chance of loss within a year, and what it was computed from."""

    annual_loss: float
    model: DurabilityModel
    tolerance_days: float
    recreate_days: float  # to re-create one peer's share of our shards
    share_bytes: float  # our shards on one peer, on average
    repair_rate: float  # bytes of shards re-created per second
    rate_measured: bool  # the repairer's own rate, not its limit
    ends_per_peer_year: float  # agreements we ended, per peer and year, as observed

    def figures(self) -> dict[str, float | int | bool]:
        """For `fluidfs status --json`."""
        return {
            "annual_loss": self.annual_loss,
            "peers": self.model.peers,
            "grouped": self.model.grouped,
            "lifetime_days": self.model.lifetime_days,
            "repair_days": self.model.repair_days,
            "tolerance_days": self.tolerance_days,
            "recreate_days": self.recreate_days,
            "share_bytes": self.share_bytes,
            "repair_rate": self.repair_rate,
            "rate_measured": self.rate_measured,
            "ends_per_peer_year": self.ends_per_peer_year,
        }


def estimate(
    *,
    holders: list[int],
    n: int,
    k: int,
    grouped: bool,
    tolerance_days: float,
    repair_rate: float,
    rate_measured: bool,
    ended_recently: int,
    observed_days: float,
) -> Estimate | None:
    """The estimate for a backup whose shards sit on peers holding *holders* bytes each.

    A peer is taken to leave for good after ASSUMED_LIFETIME_DAYS, or sooner when the
    agreements we ended lately (*ended_recently* over the last *observed_days*, at most
    OBSERVED_WINDOW_DAYS) say peers go faster; each departure costs the tolerance plus
    the time to re-create its share at *repair_rate*. None when the backup is not yet
    on N peers (nothing to estimate: blocks are below full spread).
    """
    holding = [size for size in holders if size > 0]
    if len(holding) < n or repair_rate <= 0:
        return None
    window = max(1.0, min(observed_days, OBSERVED_WINDOW_DAYS))
    ends_per_peer_year = ended_recently / len(holding) / window * YEAR_DAYS
    lifetime = 1.0 / (1.0 / ASSUMED_LIFETIME_DAYS + ends_per_peer_year / YEAR_DAYS)
    share = sum(holding) / len(holding)
    recreate_days = share / repair_rate / 86400.0
    model = DurabilityModel(
        peers=len(holding),
        lifetime_days=lifetime,
        repair_days=tolerance_days + recreate_days,
        n=n,
        k=k,
        grouped=grouped,
    )
    return Estimate(
        annual_loss=model.loss_probability(),
        model=model,
        tolerance_days=tolerance_days,
        recreate_days=recreate_days,
        share_bytes=share,
        repair_rate=repair_rate,
        rate_measured=rate_measured,
        ends_per_peer_year=ends_per_peer_year,
    )
