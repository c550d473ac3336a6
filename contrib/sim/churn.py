"""A churn simulator that runs fluidfs's own policies on a virtual clock.

    python contrib/sim/churn.py                      # 1,000 peers, 5 years (a few minutes)
    python contrib/sim/churn.py --peers 200 --years 1 --seed 7

Peers join, go offline every day (desktops and laptops), leave for days now and then
(holidays), die for good after an exponentially distributed lifetime (replaced by a
newcomer, so the pool keeps its size) and a few of them lie: they pass challenge audits
but serve corrupt shards, which only a sampled whole-shard retrieval catches. Some peers
are backup owners; each owner spreads its backup's block groups (12 holders each, any 8
rebuild) over partners it keeps agreements with.

What is fluidfs's own code, not a model of it:
- trust: ``peers.trust.TrustPolicy`` (``after`` on every audit, ``weight`` for placement);
- placement: ``peers.placement.rank`` picks each new holder, by those weights, among the
  owner's partners that hold nothing of the group;
- agreement lifecycle: ``peers.lifecycle.LifecyclePolicy`` — an agreement ends once its
  peer has failed for longer than the tolerance; hosted shards are kept for the keep
  period; an ended peer waits out the cool-down before a new agreement;
- repair order: ``net.bandwidth.repair_priority`` — each owner re-creates the group with
  the fewest live shards first, one shard at a time at its own link speeds (K shards
  fetched per shard re-created), and only while it is online (repair is the user's job).

What it reports: annual loss probability per backup (losses seen, and the Markov model of
``blocks/durability.py`` fed with the repair times this run measured), time from a lost
shard to full redundancy again (percentiles), repair traffic per owner, and the trust of
liars against honest peers over time. No sockets, no threads: one heap of events.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fluidfs.blocks.durability import DurabilityModel
from fluidfs.net.bandwidth import repair_priority
from fluidfs.peers.copysets import groups, prefer_group
from fluidfs.peers.lifecycle import DAY, LifecyclePolicy
from fluidfs.peers.placement import rank
from fluidfs.peers.trust import DEFAULT_POLICY, TrustPolicy

HOUR = 3600.0
YEAR = 365 * DAY
MBIT = 1_000_000 / 8  # bytes per second


def repair_seconds(size: float, k: int, downlink: float, uplink: float) -> float:
    """Seconds an owner needs to re-create *size* bytes of shards: K times as much
    fetched at its downlink, then sent once at its uplink (bytes/s)."""
    return k * size / downlink + size / uplink


@dataclass(frozen=True)
class PeerClass:
    """How a kind of machine is online: hours offline each day, holidays a year."""

    name: str
    share: float  # of all peers
    offline_hours: float  # each day
    holidays_per_year: float  # away for holiday_days at a time
    holiday_days: tuple[float, float] = (2.0, 10.0)


CLASSES = (
    PeerClass("server", 0.25, 0.0, 0.5, (0.2, 1.0)),
    PeerClass("desktop", 0.40, 10.0, 3.0),
    PeerClass("laptop", 0.35, 15.0, 6.0),
)


@dataclass
class SimConfig:
    """Everything a run depends on; distributions are stated in ``describe``."""

    peers: int = 1000
    years: float = 5.0
    owners: int = 100
    partners: int = 24  # agreements each owner keeps: the distinct peers its backup uses
    placement_groups: bool = True  # blocks kept within groups of N partners (copysets)
    groups: int = 48  # block groups per backup (each: 12 holders)
    backup_bytes: float = 1e12
    lifetime_days: float = 730.0  # mean, exponential
    liar_share: float = 0.02
    catch_chance: float = 0.05  # a liar caught per audit round by sampled retrieval
    audit_hours: float = 6.0
    uplink_mbit: tuple[float, float] = (20.0, 0.6)  # lognormal: median, sigma
    downlink_factor: float = 5.0
    n: int = 12
    k: int = 8
    seed: int = 1
    trust: TrustPolicy = DEFAULT_POLICY
    classes: tuple[PeerClass, ...] = CLASSES
    lifecycle: LifecyclePolicy = field(default_factory=LifecyclePolicy)

    def describe(self) -> str:
        """The assumptions, one line each."""
        classes = ", ".join(
            f"{c.share:.0%} {c.name} (offline {c.offline_hours:g} h/day, "
            f"{c.holidays_per_year:g} holidays/year of {c.holiday_days[0]:g}-"
            f"{c.holiday_days[1]:g} days)"
            for c in self.classes
        )
        return "\n".join(
            [
                f"{self.peers} peers for {self.years:g} years; lifetime exponential, mean "
                f"{self.lifetime_days:g} days; the dead are replaced by newcomers",
                f"peers: {classes}",
                f"uplinks lognormal, median {self.uplink_mbit[0]:g} Mbit/s (sigma "
                f"{self.uplink_mbit[1]:g}); downlink {self.downlink_factor:g} x uplink",
                f"{self.owners} owners, each a {self.backup_bytes / 1e12:g} TB backup in "
                f"{self.groups} groups of {self.n} shards (any {self.k} rebuild) over "
                f"{self.partners} partners, "
                + ("blocks kept within groups of N partners" if self.placement_groups
                   else "each block on any N partners"),
                f"{self.liar_share:.0%} liars, each caught with chance "
                f"{self.catch_chance:g} per audit round ({self.audit_hours:g} h)",
                f"tolerance {self.lifecycle.tolerance / DAY:g} d, keep "
                f"{self.lifecycle.keep / DAY:g} d, cool-down {self.lifecycle.cooldown / DAY:g} d",
            ]
        )


@dataclass
class Peer:
    """One machine, as the others see it."""

    ident: int
    klass: PeerClass
    uplink: float  # bytes/s
    downlink: float
    liar: bool
    trust: float
    successes: int = 0
    alive: bool = True
    online: bool = True
    away_until: float = 0.0
    failing_since: float | None = None
    banned_until: float = 0.0  # cool-down after we ended its agreements
    slots: set[tuple[int, int]] = field(default_factory=set)  # (owner, group) it holds


@dataclass
class Backup:
    """One owner's backup: its partners and, per group, the holders of its shards."""

    owner: int
    shard_bytes: float
    partners: set[int] = field(default_factory=set)
    since: dict[int, float] = field(default_factory=dict)  # partner -> agreement made at
    holders: list[list[int]] = field(default_factory=list)  # per group; -1 = missing
    missing_since: dict[tuple[int, int], float] = field(default_factory=dict)
    queue: list[tuple[int, float, int, int]] = field(default_factory=list)
    repairing: bool = False
    lost: bool = False
    fetched: float = 0.0


@dataclass
class Report:
    """What one run measured."""

    config: SimConfig
    backup_years: float
    losses: int
    repair_times: list[float]  # seconds, lost shard -> re-created
    fetched_per_owner_year: list[float]  # bytes
    recreated_bytes: float
    fetched_bytes: float
    liar_trust: list[tuple[float, float, float]]  # (years, liars' mean, honest mean)
    distinct_peers: float
    seconds: float

    def model(self) -> DurabilityModel:
        """The Markov model fed with this run's measured repair time."""
        mean_repair = statistics.fmean(self.repair_times) / DAY if self.repair_times else 1.0
        return DurabilityModel(
            peers=max(self.config.n, round(self.distinct_peers)),
            lifetime_days=self.config.lifetime_days,
            repair_days=max(mean_repair, 1e-3),
            n=self.config.n,
            k=self.config.k,
            grouped=self.config.placement_groups,
        )

    def lines(self) -> list[str]:
        """The report, as printed."""
        times = sorted(self.repair_times)

        def pct(p: float) -> str:
            if not times:
                return "-"
            return f"{times[min(len(times) - 1, int(p * len(times)))] / HOUR:.1f} h"

        model = self.model()
        fetched = self.fetched_per_owner_year or [0.0]
        out = [
            f"simulated {self.config.years:g} years of {self.config.peers} peers in "
            f"{self.seconds:.1f} s",
            f"losses: {self.losses} in {self.backup_years:.0f} backup-years "
            f"(observed rate {self.losses / max(self.backup_years, 1e-9):.2g} per backup-year)",
            f"modelled annual loss per backup: {model.loss_probability():.2g} "
            f"({model.peers} peers{' in groups of N' if model.grouped else ''}, lifetime "
            f"{model.lifetime_days:g} d, measured mean repair "
            f"{model.repair_days:.2f} d)",
            f"lost shard -> full redundancy: p50 {pct(0.5)}, p90 {pct(0.9)}, p99 {pct(0.99)} "
            f"({len(times)} shards re-created)",
            f"repair traffic per owner: mean {statistics.fmean(fetched) / 1e9:.1f} GB/year "
            f"fetched, p90 {sorted(fetched)[int(0.9 * (len(fetched) - 1))] / 1e9:.1f} GB/year; "
            f"{self.fetched_bytes / max(self.recreated_bytes, 1):.1f} bytes fetched per byte "
            "re-created",
            "trust over time (liars / honest): "
            + ", ".join(f"{y:.1f} y {a:.2f}/{b:.2f}" for y, a, b in self.liar_trust),
        ]
        return out


class Simulation:
    """One run: peers, owners' backups and a heap of timed events."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.peers: dict[int, Peer] = {}
        self.ids = itertools.count()
        self.backups: dict[int, Backup] = {}
        self.repair_times: list[float] = []
        self.recreated = 0.0
        self.fetched = 0.0
        self.losses = 0
        self.liar_trust: list[tuple[float, float, float]] = []

    # --- events ---------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run *action* at virtual time *when*."""
        heapq.heappush(self.events, (when, next(self.seq), action))

    def run(self) -> Report:
        """Simulate the configured years; the report of what happened."""
        started = time.perf_counter()
        config = self.config
        for _ in range(config.peers):
            self._join()
        alive = [p.ident for p in self.peers.values()]
        for owner in self.rng.sample(alive, config.owners):
            self._start_backup(owner)
        self.at(config.audit_hours * HOUR, self._audit_round)
        self.at(0.0, self._sample_trust)
        end = config.years * YEAR
        while self.events and self.events[0][0] <= end:
            self.now, _, action = heapq.heappop(self.events)
            action()
        owner_years = [
            b.fetched / config.years for b in self.backups.values()
        ]
        distinct = statistics.fmean(
            len({h for group in b.holders for h in group if h >= 0})
            for b in self.backups.values()
        )
        return Report(
            config=config,
            backup_years=config.owners * config.years,
            losses=self.losses,
            repair_times=self.repair_times,
            fetched_per_owner_year=owner_years,
            recreated_bytes=self.recreated,
            fetched_bytes=self.fetched,
            liar_trust=self.liar_trust,
            distinct_peers=distinct,
            seconds=time.perf_counter() - started,
        )

    # --- peers ----------------------------------------------------------------------

    def _join(self) -> Peer:
        config, rng = self.config, self.rng
        klass = rng.choices(config.classes, weights=[c.share for c in config.classes])[0]
        up = rng.lognormvariate(math.log(config.uplink_mbit[0]), config.uplink_mbit[1]) * MBIT
        peer = Peer(
            ident=next(self.ids),
            klass=klass,
            uplink=up,
            downlink=up * config.downlink_factor,
            liar=rng.random() < config.liar_share,
            trust=config.trust.initial,
        )
        self.peers[peer.ident] = peer
        self.at(self.now + rng.expovariate(1.0 / (config.lifetime_days * DAY)),
                lambda: self._die(peer))
        if klass.offline_hours > 0:  # first daily switch-off at a random hour
            self.at(self.now + rng.uniform(0, DAY), lambda: self._daily_off(peer))
        if klass.holidays_per_year > 0:
            self._next_holiday(peer)
        return peer

    def _set_online(self, peer: Peer, online: bool) -> None:
        if not peer.alive or peer.online == online:
            return
        peer.online = online
        if online:
            peer.failing_since = None
            if peer.ident in self.backups:
                self._repair_next(self.backups[peer.ident])
        elif peer.failing_since is None:
            peer.failing_since = self.now

    def _daily_off(self, peer: Peer) -> None:
        if not peer.alive:
            return
        if self.now >= peer.away_until:
            self._set_online(peer, False)
            back = self.now + peer.klass.offline_hours * HOUR
            self.at(back, lambda: self._set_online(peer, self.now >= peer.away_until))
        self.at(self.now + DAY, lambda: self._daily_off(peer))

    def _next_holiday(self, peer: Peer) -> None:
        klass = peer.klass
        start = self.now + self.rng.expovariate(klass.holidays_per_year / YEAR)
        length = self.rng.uniform(*klass.holiday_days) * DAY

        def leave() -> None:
            if not peer.alive:
                return
            peer.away_until = self.now + length
            self._set_online(peer, False)
            self.at(peer.away_until, lambda: self._set_online(peer, True))
            self._next_holiday(peer)

        self.at(start, leave)

    def _die(self, peer: Peer) -> None:
        """Gone for good: what it held is gone at once, but its owners learn it only as
        any silent peer, when its failures outlast the tolerance. A newcomer joins."""
        if not peer.alive:
            return
        self._set_online(peer, False)
        peer.alive = False
        for owner, group in list(peer.slots):
            backup = self.backups[owner]
            if not backup.lost and self._lost_group(backup, group):
                backup.lost = True
                self.losses += 1
        if peer.ident in self.backups:  # its own backup goes with it; a newcomer starts one
            gone = self.backups.pop(peer.ident)
            for group, holders in enumerate(gone.holders):
                for ident in holders:
                    if ident >= 0:
                        self.peers[ident].slots.discard((gone.owner, group))
            newcomer = self._join()
            self._start_backup(newcomer.ident)
        else:
            self._join()

    # --- audits, trust, agreement ends ----------------------------------------------

    def _audit_round(self) -> None:
        config, policy = self.config, self.config.trust
        tolerance = config.lifecycle.tolerance
        for peer in list(self.peers.values()):
            if peer.online:
                if peer.liar and self.rng.random() < config.catch_chance:
                    self._caught(peer)
                    continue
                peer.trust = policy.after(peer.trust, True)
                peer.successes += 1
            else:
                peer.trust = policy.after(peer.trust, False)
                if peer.failing_since is not None and self.now - peer.failing_since > tolerance:
                    self._end_agreements(peer)
                    if not peer.alive:
                        del self.peers[peer.ident]
        self.at(self.now + config.audit_hours * HOUR, self._audit_round)

    def _caught(self, peer: Peer) -> None:
        """A lie is evidence: trust to the floor, every agreement with it ends."""
        peer.trust = self.config.trust.floor
        self._end_agreements(peer)

    def _end_agreements(self, peer: Peer) -> None:
        peer.banned_until = self.now + self.config.lifecycle.cooldown
        for owner, group in list(peer.slots):
            self._slot_lost(self.backups[owner], group, peer)
        for backup in self.backups.values():
            if peer.ident in backup.partners:
                backup.partners.discard(peer.ident)
                backup.since.pop(peer.ident, None)
                self._fill_partners(backup)

    # --- backups and repair ---------------------------------------------------------

    def _start_backup(self, owner: int) -> None:
        config = self.config
        shard = config.backup_bytes / (config.groups * config.k)
        backup = Backup(owner=owner, shard_bytes=shard)
        self.backups[owner] = backup
        self._fill_partners(backup)
        for group in range(config.groups):
            backup.holders.append([-1] * config.n)
            for slot in range(config.n):
                holder = self._choose(backup, group)
                if holder is None:
                    backup.missing_since[(group, slot)] = self.now
                    continue
                self._place(backup, group, slot, holder)

    def _fill_partners(self, backup: Backup) -> None:
        """Keep the owner's partner set at its size, best-weighted peers first."""
        want = self.config.partners - len(backup.partners)
        if want <= 0:
            return
        policy = self.config.trust
        weights = {
            p.ident.to_bytes(8, "big"): policy.weight(p.trust, p.successes)
            for p in self.peers.values()
            if p.alive and p.ident != backup.owner and p.ident not in backup.partners
            and p.banned_until <= self.now
        }
        for key in rank(weights, self.rng)[:want]:
            backup.partners.add(int.from_bytes(key, "big"))
            backup.since[int.from_bytes(key, "big")] = self.now

    def _choose(self, backup: Backup, group: int) -> int | None:
        holding = set(backup.holders[group])
        policy = self.config.trust
        weights = {
            ident.to_bytes(8, "big"): policy.weight(p.trust, p.successes)
            for ident in backup.partners
            if ident not in holding and (p := self.peers[ident]).alive and p.online
        }
        ranked = rank(weights, self.rng)
        if self.config.placement_groups and ranked:
            made = [(backup.since[i], i.to_bytes(8, "big")) for i in backup.partners]
            held = [i.to_bytes(8, "big") for i in holding if i >= 0]
            ranked = prefer_group(ranked, groups(made, self.config.n), held)
        return int.from_bytes(ranked[0], "big") if ranked else None

    def _place(self, backup: Backup, group: int, slot: int, holder: int) -> None:
        backup.holders[group][slot] = holder
        self.peers[holder].slots.add((backup.owner, group))

    def _slot_lost(self, backup: Backup, group: int, holder: Peer) -> None:
        holders = backup.holders[group]
        holder.slots.discard((backup.owner, group))
        for slot, ident in enumerate(holders):
            if ident == holder.ident:  # unavailable since it went silent, not since we noticed
                holders[slot] = -1
                since = holder.failing_since if holder.failing_since is not None else self.now
                backup.missing_since[(group, slot)] = since
        live = sum(1 for ident in holders if ident >= 0)
        heapq.heappush(backup.queue, (repair_priority(live), self.now, group, 0))
        self._repair_next(backup)

    def _lost_group(self, backup: Backup, group: int) -> bool:
        """Fewer than K shards survive: dead holders' shards are gone; an ended
        agreement's holder still has them for the keep period, which repair beats."""
        surviving = sum(
            1 for ident in backup.holders[group] if ident >= 0 and self.peers[ident].alive
        )
        return surviving < self.config.k

    def _repair_next(self, backup: Backup) -> None:
        owner = self.peers.get(backup.owner)
        if backup.repairing or owner is None or not owner.online or not backup.queue:
            return
        while backup.queue:
            _, _, group, _ = heapq.heappop(backup.queue)
            if -1 in backup.holders[group]:
                break
        else:
            return
        holder = self._choose(backup, group)
        if holder is None:  # nobody to take it now; try again later
            heapq.heappush(backup.queue, (repair_priority(0), self.now, group, 0))
            self.at(self.now + HOUR, lambda: self._repair_next(backup))
            return
        size = backup.shard_bytes
        seconds = repair_seconds(size, self.config.k, owner.downlink, owner.uplink)
        backup.repairing = True

        def done() -> None:
            backup.repairing = False
            if backup.owner not in self.backups:
                return
            alive_owner = self.peers.get(backup.owner)
            target = self.peers.get(holder)
            holders = backup.holders[group]
            if (alive_owner is None or not alive_owner.online or target is None
                    or not target.alive or -1 not in holders or holder in holders):
                heapq.heappush(backup.queue, (repair_priority(0), self.now, group, 0))
            else:
                slot = holders.index(-1)
                self._place(backup, group, slot, holder)
                self.repair_times.append(self.now - backup.missing_since.pop((group, slot)))
                self.recreated += size
                self.fetched += self.config.k * size
                backup.fetched += self.config.k * size
                if -1 in holders:
                    live = sum(1 for ident in holders if ident >= 0)
                    heapq.heappush(backup.queue, (repair_priority(live), self.now, group, 0))
            self._repair_next(backup)

        self.at(self.now + seconds, done)

    def _sample_trust(self) -> None:
        liars = [p.trust for p in self.peers.values() if p.alive and p.liar]
        honest = [p.trust for p in self.peers.values() if p.alive and not p.liar]
        self.liar_trust.append((
            self.now / YEAR,
            statistics.fmean(liars) if liars else float("nan"),
            statistics.fmean(honest) if honest else float("nan"),
        ))
        self.at(self.now + YEAR / 2, self._sample_trust)


def main(argv: list[str] | None = None) -> int:
    """Run one simulation and print its report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--years", type=float, default=5.0)
    parser.add_argument("--owners", type=int, default=100)
    parser.add_argument("--partners", type=int, default=24)
    parser.add_argument("--spread", action="store_true",
                        help="place each block on any N partners (no placement groups)")
    parser.add_argument("--lifetime-days", type=float, default=730.0)
    parser.add_argument("--tolerance-days", type=float, default=1.0)
    parser.add_argument("--liars", type=float, default=0.02, help="share of peers that lie")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    day = args.tolerance_days * DAY
    config = SimConfig(
        peers=args.peers, years=args.years, owners=args.owners, partners=args.partners,
        placement_groups=not args.spread,
        lifetime_days=args.lifetime_days, liar_share=args.liars, seed=args.seed,
        lifecycle=LifecyclePolicy(tolerance=day, keep=DAY, cooldown=max(day, DAY)),
    )
    print(config.describe())
    print()
    for line in Simulation(config).run().lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
