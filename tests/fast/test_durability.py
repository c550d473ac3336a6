"""The durability model and the churn simulator that drives fluidfs's own policies."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from fluidfs import keys
from fluidfs.blocks.durability import DurabilityModel, estimate, loss_probability
from fluidfs.cli.inspect import durability_lines
from fluidfs.node.node import Node, NodeConfig
from fluidfs.peers.lifecycle import DAY, LifecyclePolicy
from fluidfs.statedir import StateDir

SIM = Path(__file__).resolve().parents[2] / "contrib" / "sim" / "churn.py"


def _churn():
    spec = importlib.util.spec_from_file_location("churn", SIM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["churn"] = module
    spec.loader.exec_module(module)
    return module


churn = _churn()


@pytest.mark.parametrize(
    ("peers", "repair_days", "expected"),
    [  # issue 18's table (8-of-12, 2-year lifetimes), computed independently with scipy
        (16, 2.0, 5.8e-7),
        (24, 1.0, 3.6e-7),
        (24, 1.5, 1.8e-6),
        (24, 2.0, 5.5e-6),
        (24, 7.0, 6.5e-4),
        (48, 1.0, 1.4e-5),
        (48, 7.0, 1.9e-2),
    ],
)
def test_the_model_gives_the_annual_loss_of_the_issue_table(
    peers: int, repair_days: float, expected: float
) -> None:
    got = loss_probability(peers, 730.0, repair_days)
    assert math.isclose(got, expected, rel_tol=0.05), got


def test_more_peers_and_slower_repair_both_raise_the_risk() -> None:
    base = DurabilityModel(peers=24, lifetime_days=730, repair_days=1.0).loss_probability()
    assert DurabilityModel(48, 730, 1.0).loss_probability() > base
    assert DurabilityModel(24, 730, 2.0).loss_probability() > base
    assert DurabilityModel(24, 1460, 1.0).loss_probability() < base


def test_the_model_refuses_inputs_that_describe_no_backup() -> None:
    with pytest.raises(ValueError):
        loss_probability(8, 730, 1.0)  # fewer peers than shards
    with pytest.raises(ValueError):
        loss_probability(24, 0, 1.0)


def _small(**changes) -> churn.SimConfig:
    settings = dict(peers=120, years=0.5, owners=8, partners=20, groups=6, seed=3)
    settings.update(changes)
    return churn.SimConfig(**settings)


ALWAYS_ON = (churn.PeerClass("server", 1.0, 0.0, 0.0),)


def test_a_network_that_never_fails_repairs_nothing_and_loses_nothing() -> None:
    report = churn.Simulation(
        _small(classes=ALWAYS_ON, lifetime_days=1e9, liar_share=0.0)
    ).run()
    assert report.losses == 0
    assert report.repair_times == [] and report.fetched_bytes == 0
    assert 12 <= report.distinct_peers <= 20  # each backup on its partners only


def test_a_dead_peer_is_repaired_after_the_tolerance_at_k_bytes_fetched_per_byte() -> None:
    report = churn.Simulation(
        _small(classes=ALWAYS_ON, lifetime_days=200, liar_share=0.0)
    ).run()
    assert report.repair_times, "peers died, their shards were re-created"
    assert min(report.repair_times) > LifecyclePolicy().tolerance  # nobody knew sooner
    assert report.fetched_bytes == pytest.approx(8 * report.recreated_bytes)


def test_caught_liars_stay_at_the_trust_floor_while_honest_peers_rise() -> None:
    report = churn.Simulation(_small(classes=ALWAYS_ON, lifetime_days=1e9, liar_share=0.1)).run()
    _, liars, honest = report.liar_trust[-1]
    assert liars < 0.1 < 10 < honest


def test_a_longer_tolerance_rides_out_holidays_with_less_repair() -> None:
    def recreated(tolerance_days: float) -> float:
        policy = LifecyclePolicy(tolerance=tolerance_days * DAY)
        return churn.Simulation(_small(lifecycle=policy, lifetime_days=1e9)).run().recreated_bytes

    assert recreated(14) < recreated(1) / 2


def test_placement_groups_cut_the_risk_of_a_wide_spread() -> None:
    spread = DurabilityModel(48, 730, 1.0).loss_probability()
    grouped = DurabilityModel(48, 730, 1.0, grouped=True).loss_probability()
    assert grouped < spread / 100
    # fewer than 2N peers make one group: the same as spreading
    assert DurabilityModel(20, 730, 1.0, grouped=True).loss_probability() == (
        DurabilityModel(20, 730, 1.0).loss_probability()
    )


GIB = 1 << 30


def test_the_estimate_waits_for_a_full_spread_and_follows_the_repair_time() -> None:
    common = dict(n=12, k=8, grouped=True, tolerance_days=1.0, rate_measured=False,
                  ended_recently=0, observed_days=30.0)
    assert estimate(holders=[40 * GIB] * 11 + [0], repair_rate=64e6, **common) is None
    fast = estimate(holders=[40 * GIB] * 24, repair_rate=64e6, **common)
    assert fast is not None and fast.model.peers == 24
    assert fast.recreate_days == pytest.approx(40 * GIB / 64e6 / 86400)
    assert fast.annual_loss == pytest.approx(DurabilityModel(
        24, 730.0, 1.0 + fast.recreate_days, grouped=True).loss_probability())
    slow = estimate(holders=[40 * GIB] * 24, repair_rate=64e3, **common)  # a thin line
    assert slow is not None and slow.recreate_days > 7 and slow.annual_loss > 100 * fast.annual_loss


def test_agreements_we_ended_lately_shorten_the_lifetime_the_estimate_assumes() -> None:
    common = dict(holders=[GIB] * 24, n=12, k=8, grouped=False, tolerance_days=1.0,
                  repair_rate=64e6, rate_measured=True, observed_days=30.0)
    calm = estimate(ended_recently=0, **common)
    churning = estimate(ended_recently=6, **common)  # 6 of 24 in 30 days: ~3 a year each
    assert calm is not None and churning is not None
    assert calm.model.lifetime_days == 730.0
    assert churning.model.lifetime_days < 120
    assert churning.annual_loss > 1000 * calm.annual_loss


async def test_status_shows_the_chance_of_losing_data_with_its_assumptions(
    tmp_path: Path,
) -> None:
    ring = keys.KeyRing(keys.generate())
    node = Node(NodeConfig(ring, StateDir(tmp_path / "state"), listen="127.0.0.1:0"))
    try:
        await node.start()
        peers = [keys.KeyRing(keys.generate()).public_key for _ in range(24)]
        for key in peers[:11]:
            node.ledger.record(key, we_host=64 * GIB, they_host=64 * GIB, term=3600)
            node.ledger.add_use(key, 2 * GIB)
        figures = await node.status.report()
        assert figures["durability"] is None
        assert durability_lines(None, 12) == [
            "durability:  no estimate until the backup is on 12 peers"]
        for key in peers[11:]:
            node.ledger.record(key, we_host=64 * GIB, they_host=64 * GIB, term=3600)
            node.ledger.add_use(key, 2 * GIB)
        figures = await node.status.report()
    finally:
        node.close()
    shown = figures["durability"]
    assert shown["peers"] == 24 and shown["grouped"] and not shown["rate_measured"]
    assert shown["repair_rate"] == 64 * 1024 * 1024  # the repair cap: no limits set
    assert 0 < shown["annual_loss"] < 1e-6
    first, second = durability_lines(shown, 12)
    assert "estimated chance of losing data this year: " in first
    assert "24 peers, in groups of 12" in second and "1 days' tolerance" in second
